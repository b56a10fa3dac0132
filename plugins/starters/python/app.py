"""{{name}}: an Arges boot policy. The appliance asks it how each booting machine boots;
the contract, with what the host provides and its limits, is wit/plugin.wit.

Config ([plugins.config.{{name}}] in appliance.toml): `environment`, the environment
accepted machines boot.
"""

import wit_world
from wit_world.imports import config, log, types


class WitWorld(wit_world.WitWorld):
    def decide(self, facts: types.MachineFacts) -> types.BootAction:
        labels = dict(facts.inventory.labels)
        if labels.get("quarantine") == "true":
            log.log(log.Level.WARN, f"refusing {facts.mac}: quarantined")
            # Shown on the machine's console as written.
            return types.BootAction_Deny("quarantined (label quarantine=true): ask the operator")
        # A machine that has not registered has no hardware facts yet (all zero): a rule
        # on its disks or memory would refuse every new machine. Let it discover.
        if not facts.inventory.registered:
            return types.BootAction_Pass()
        env = config.get("environment")
        if env and facts.inventory.accepted and not facts.inventory.cordoned:
            return types.BootAction_Environment(env)
        # No opinion: the next plugin in the chain decides, or the built-in policy.
        # (Raising wit_world.types.Err("why") fails the call: logged, and the built-in
        # decision is used.)
        return types.BootAction_Pass()

"""deny-list: an Arges boot policy written in Python, to show the plugin contract is not
tied to Rust.

Refuses to boot machines whose MAC is listed in the config key `macs` (comma-separated),
or that carry the label `quarantine=true`; every other machine is left to the next policy.

Build: componentize-py -d ../../wit -w boot-policy componentize app -o deny-list.wasm
"""

import wit_world
from wit_world.imports import config, log, types


class WitWorld(wit_world.WitWorld):
    def decide(self, facts: types.MachineFacts) -> types.BootAction:
        listed = {m.strip().lower() for m in (config.get("macs") or "").split(",") if m.strip()}
        labels = dict(facts.inventory.labels)
        if facts.mac is not None and facts.mac in listed:
            log.log(log.Level.WARN, f"refusing to boot {facts.mac}: on the deny list")
            return types.BootAction_Deny(f"MAC {facts.mac} is on the deny list")
        if labels.get("quarantine") == "true":
            return types.BootAction_Deny("this machine is quarantined")
        return types.BootAction_Pass()

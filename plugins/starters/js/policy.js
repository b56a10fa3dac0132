// {{name}}: an Arges boot policy. The appliance asks it how each booting machine boots;
// the contract, with what the host provides and its limits, is wit/plugin.wit.
//
// Config ([plugins.config.{{name}}] in appliance.toml): `environment`, the environment
// accepted machines boot.
//
// How the WIT maps here: records have camelCase fields (facts.clientAddress,
// facts.hardware.memoryBytes, a BigInt since it is a u64); an absent option is
// undefined; a list of pairs is an array of [key, value]; a variant is {tag, val} with
// the WIT's name as tag ('local-disk'); returning is `ok`, and throwing a string is
// `err` (logged, and the built-in decision is used).
import { log } from 'arges:plugin/log@{{version}}';
import { get } from 'arges:plugin/config@{{version}}';

export function decide(facts) {
  const labels = new Map(facts.inventory.labels);
  if (labels.get('quarantine') === 'true') {
    log('warn', `refusing ${facts.mac}: quarantined`);
    // Shown on the machine's console as written.
    return { tag: 'deny', val: 'quarantined (label quarantine=true): ask the operator' };
  }
  // A machine that has not registered has no hardware facts yet (all zero): a rule on
  // its disks or memory would refuse every new machine. Let it discover.
  if (!facts.inventory.registered) {
    return { tag: 'pass' };
  }
  const env = get('environment');
  if (env && facts.inventory.accepted && !facts.inventory.cordoned) {
    return { tag: 'environment', val: env };
  }
  // No opinion: the next plugin in the chain decides, or the built-in policy.
  return { tag: 'pass' };
}

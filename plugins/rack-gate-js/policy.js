// rack-gate: an Arges boot policy written in JavaScript (componentize-js), to show the
// plugin contract is not tied to Rust or Python.
//
// Refuses to boot machines whose `rack` label names a rack listed in the config key
// `closed_racks` (comma-separated), e.g. while a rack's power or network is worked on;
// the reason, with the optional config key `why`, is shown on the machine's console.
// Every other machine is left to the next policy.
//
// Build: plugins/build.sh (componentize-js policy.js --wit ../../wit
//   --world-name boot-policy --disable http fetch-event --out rack-gate-js.wasm)
import { log } from 'arges:plugin/log@0.1.1';
import { get } from 'arges:plugin/config@0.1.1';

export function decide(facts) {
  const closed = (get('closed_racks') ?? '')
    .split(',')
    .map((r) => r.trim())
    .filter((r) => r.length > 0);
  const rack = new Map(facts.inventory.labels).get('rack');
  if (rack !== undefined && closed.includes(rack)) {
    const why = get('why');
    log('info', `holding ${facts.mac ?? facts.uuid}: rack ${rack} is closed`);
    return { tag: 'deny', val: `rack ${rack} is closed (${why ?? 'config closed_racks'})` };
  }
  return { tag: 'pass' };
}

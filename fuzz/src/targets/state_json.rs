//! A snapshot's `state.json` (`vmm::snapshot::SnapshotState`: the versioned `VmState` and the
//! table of copied memory ranges), as `vm.restore` reads it. What parses must encode back to the
//! same document and parse again (no silent loss of a register on the way to KVM).

use vmm::snapshot::SnapshotState;

use crate::{message_kind, signature, Target};

pub struct StateJsonTarget;

impl Target for StateJsonTarget {
    fn name(&self) -> &'static str {
        "state_json"
    }

    fn seeds(&mut self) -> Vec<Vec<u8>> {
        // The real seed is the committed state.json of a paused counter guest (corpus).
        vec![br#"{"vm":{"version":1},"memory_ranges":[{"gpa":0,"length":4096}]}"#.to_vec()]
    }

    fn dictionary(&self) -> &'static [&'static [u8]] {
        &[
            b"\"version\":",
            b"\"memory_ranges\":",
            b"\"gpa\":",
            b"\"length\":",
            b"\"vcpus\":",
            b"\"xsave\":",
            b"\"msrs\":",
            b"null",
            b"[]",
            b"{}",
            b"-1",
        ]
    }

    fn max_len(&self) -> usize {
        256 << 10
    }

    fn execute(&mut self, input: &[u8]) -> Result<u64, String> {
        match serde_json::from_slice::<SnapshotState>(input) {
            Ok(state) => {
                let encoded =
                    serde_json::to_value(&state).map_err(|e| format!("re-encoding: {e}"))?;
                let again: SnapshotState =
                    serde_json::from_value(encoded.clone()).map_err(|e| {
                        format!("an accepted state.json does not parse after its round trip: {e}")
                    })?;
                let twice = serde_json::to_value(&again).map_err(|e| e.to_string())?;
                if twice != encoded {
                    return Err("an accepted state.json changes on its round trip".into());
                }
                Ok(signature(&[b"ok", &[state.vm.vcpus.len() as u8]]))
            }
            Err(error) => Ok(signature(&[message_kind(&error.to_string(), 3).as_bytes()])),
        }
    }
}

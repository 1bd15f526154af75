//! Damaged regions: random bit flips and truncations of a valid region must
//! give a typed error or a region whose every recoverable state is one that
//! was committed — never a panic, never corrupted state presented as valid.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use nv_extension::persistence::memory::MemoryBackend;
use nv_extension::{Error, OpenOptions, Region, RunKind, ShutdownKind};
use proptest::prelude::*;

mod common;
use common::save_blob;

/// Everything ever committed for one VM.
#[derive(Default, Debug)]
struct Committed {
    configs: Vec<Vec<u8>>,
    states: Vec<(u64, Vec<u8>)>,
}

struct Fixture {
    image: Vec<u8>,
    committed: BTreeMap<String, Committed>,
    /// Offsets worth aiming at: superblocks, table copies, state slots.
    metadata_len: usize,
}

fn save(handle: &mut nv_extension::VmHandle, blob: &[u8], committed: &mut Committed) {
    handle.begin_run(RunKind::Resume).unwrap();
    let report = save_blob(handle, blob, ShutdownKind::PowerFail).unwrap();
    committed.states.push((report.seq, blob.to_vec()));
}

/// A region with a saved VM, a running VM and a never-run VM, as file bytes.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("region.nv");
        let options = OpenOptions {
            create_if_missing: true,
            state_slot_len: 4096,
            ..OpenOptions::compact()
        };
        let region = Region::open(&path, &options).unwrap();
        let mut committed: BTreeMap<String, Committed> = BTreeMap::new();
        for (name, config) in [
            ("saved", &b"{\"a\":1}"[..]),
            ("running", b"{\"b\":2}"),
            ("idle", b""),
        ] {
            region.create_vm(name, 8192, config).unwrap();
            committed
                .entry(name.into())
                .or_default()
                .configs
                .push(config.to_vec());
        }
        {
            let mut saved = region.claim_vm("saved").unwrap();
            let c = committed.get_mut("saved").unwrap();
            save(&mut saved, &[0x11; 700], c);
            save(&mut saved, &[0x22; 900], c);
            saved.set_config_blob(b"{\"a\":3}").unwrap();
            c.configs.push(b"{\"a\":3}".to_vec());
            save(&mut saved, &[0x33; 500], c);
            drop(saved);
            let mut running = region.claim_vm("running").unwrap();
            let c = committed.get_mut("running").unwrap();
            save(&mut running, &[0x44; 300], c);
            running.begin_run(RunKind::Resume).unwrap();
            // The host dies here: "running" is the last table update and the
            // previous table copy still says "saved". Leak the handle so its
            // drop does not write another table update.
            std::mem::forget(running);
        }
        drop(region);
        Fixture {
            image: std::fs::read(&path).unwrap(),
            committed,
            metadata_len: 6 * 4096,
        }
    })
}

/// Opens a damaged image; checks every VM it reports against what was committed.
fn check(image: Vec<u8>, single_flip: bool) -> Result<(), TestCaseError> {
    let fixture = fixture();
    let region = match Region::open_store(
        Box::new(MemoryBackend::new(image)),
        Path::new("damaged"),
        &OpenOptions::default(),
    ) {
        Ok(region) => region,
        Err(e) => {
            // A typed error with a message; which one depends on where the damage hit.
            prop_assert!(!e.to_string().is_empty());
            return Ok(());
        }
    };
    let vms = match region.list_vms() {
        Ok(vms) => vms,
        Err(_) => return Ok(()),
    };
    for vm in vms {
        let Some(committed) = fixture.committed.get(&vm.name) else {
            return Err(TestCaseError::fail(format!("invented VM {:?}", vm.name)));
        };
        if let Ok(config) = region.config_blob(&vm.name) {
            prop_assert!(
                committed.configs.contains(&config),
                "config of {} never committed",
                vm.name
            );
        }
        match region.inspect_recovery(&vm.name) {
            Ok(recovered) => {
                let pair = (recovered.seq, recovered.state_blob);
                prop_assert!(
                    committed.states.contains(&pair),
                    "{}: recovered a state never committed",
                    vm.name
                );
                if single_flip {
                    prop_assert_eq!(
                        Some(&pair),
                        committed.states.last(),
                        "{}: one flip resumed older state",
                        vm.name
                    );
                    prop_assert_ne!(vm.name.as_str(), "running", "a running VM was resumed");
                }
            }
            Err(Error::UnsafeShutdown) | Err(Error::NothingToRecover(_)) => {}
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
    Ok(())
}

proptest! {
    // Failures print their minimal case; nothing is written into the source tree.
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_single_bit_flip_anywhere_in_the_metadata_never_yields_corrupt_or_stale_state(
        position in any::<usize>(),
        bit in 0u8..8,
    ) {
        let fixture = fixture();
        let mut image = fixture.image.clone();
        let position = position % image.len();
        image[position] ^= 1 << bit;
        check(image, true)?;
    }

    #[test]
    fn many_random_byte_changes_never_panic_or_invent_state(
        changes in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..40),
        metadata_only in any::<bool>(),
    ) {
        let fixture = fixture();
        let mut image = fixture.image.clone();
        let span = if metadata_only { fixture.metadata_len } else { image.len() };
        for (position, value) in changes {
            image[position % span] = value;
        }
        check(image, false)?;
    }

    #[test]
    fn truncation_is_refused_with_a_typed_error(len in any::<usize>()) {
        let fixture = fixture();
        let image = fixture.image[..len % fixture.image.len()].to_vec();
        let result = Region::open_store(Box::new(MemoryBackend::new(image)), Path::new("short"), &OpenOptions::default());
        match result {
            Err(Error::Truncated { .. }) | Err(Error::NotARegion { .. }) => {}
            Err(e) => return Err(TestCaseError::fail(format!("unexpected error kind: {e}"))),
            Ok(_) => return Err(TestCaseError::fail("a truncated region opened")),
        }
    }
}

#[test]
fn fixture_recovers_exactly_what_was_committed() {
    let fixture = fixture();
    let region = Region::open_store(
        Box::new(MemoryBackend::new(fixture.image.clone())),
        Path::new("intact"),
        &OpenOptions::default(),
    )
    .unwrap();
    let recovered = region.inspect_recovery("saved").unwrap();
    assert_eq!(recovered.state_blob, vec![0x33; 500]);
    assert_eq!(recovered.config_blob, b"{\"a\":3}");
    assert!(matches!(
        region.inspect_recovery("running"),
        Err(Error::UnsafeShutdown)
    ));
    assert!(matches!(
        region.inspect_recovery("idle"),
        Err(Error::NothingToRecover(_))
    ));
}

#[test]
fn wrong_magic_and_zeroed_superblocks_are_named_in_the_error() {
    let fixture = fixture();
    let mut image = fixture.image.clone();
    image[0..8].copy_from_slice(b"QFI\xfbXXXX");
    image[4096..4104].copy_from_slice(b"QFI\xfbXXXX");
    let err = Region::open_store(
        Box::new(MemoryBackend::new(image.clone())),
        Path::new("img"),
        &OpenOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("no NV region magic"), "{err}");
    image[..8192].fill(0);
    let err = Region::open_store(
        Box::new(MemoryBackend::new(image)),
        Path::new("img"),
        &OpenOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("zero-filled"), "{err}");
    let mut flipped = fixture.image.clone();
    flipped[50] ^= 4;
    flipped[4096 + 50] ^= 4;
    let err = Region::open_store(
        Box::new(MemoryBackend::new(flipped)),
        Path::new("img"),
        &OpenOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::CorruptSuperblock(_)), "{err}");
}

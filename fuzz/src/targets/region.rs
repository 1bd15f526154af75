//! Opening an NV region file of arbitrary bytes (`nv_extension::Region::open`), listing its VMs,
//! reading each one's stored config, save report and recoverable state, and the VMM's
//! `vmm.nv-regions` listing of it. A damaged region must be refused with an error, never panic.
//! Seeds are real regions (one with a VM in it) made at start-up, mutated in place.

use std::path::PathBuf;

use nv_extension::{OpenOptions, Region};

use crate::{message_kind, signature, Target};

pub struct RegionTarget {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl RegionTarget {
    pub fn new() -> anyhow::Result<RegionTarget> {
        let dir = super::scratch_dir()?;
        let path = dir.path().join("region");
        Ok(RegionTarget { dir, path })
    }

    /// A fresh region with a small layout; `vms` VMs with a stored config.
    fn make_seed(&self, vms: usize) -> anyhow::Result<Vec<u8>> {
        let path = self.dir.path().join(format!("seed-{vms}"));
        let options = OpenOptions {
            create_if_missing: true,
            ..OpenOptions::compact()
        };
        let region = Region::open(&path, &options)?;
        for index in 0..vms {
            let config = format!(
                r#"{{"payload":{{"kernel":"/k"}},"memory":{{"size":{}}}}}"#,
                8192
            );
            region.create_vm(&format!("vm{index}"), 8192, config.as_bytes())?;
        }
        drop(region);
        let bytes = std::fs::read(&path)?;
        std::fs::remove_file(&path)?;
        Ok(bytes)
    }
}

impl Target for RegionTarget {
    fn name(&self) -> &'static str {
        "region"
    }

    fn seeds(&mut self) -> Vec<Vec<u8>> {
        (0..3).filter_map(|vms| self.make_seed(vms).ok()).collect()
    }

    fn max_len(&self) -> usize {
        1 << 20
    }

    fn fixed_size(&self) -> bool {
        true
    }

    fn execute(&mut self, input: &[u8]) -> Result<u64, String> {
        std::fs::write(&self.path, input).map_err(|e| format!("writing the region file: {e}"))?;
        let mut parts: Vec<String> = Vec::new();
        match Region::open(&self.path, &OpenOptions::default()) {
            Ok(region) => {
                parts.push("open".into());
                match region.list_vms() {
                    Ok(vms) => {
                        for vm in vms {
                            parts.push(format!("vm {}", vm.status()));
                            let _ = region.config_blob(&vm.name);
                            let _ = region.last_save_report(&vm.name);
                            match region.inspect_recovery(&vm.name) {
                                Ok(_) => parts.push("recoverable".into()),
                                Err(error) => parts.push(message_kind(&error.to_string(), 3)),
                            }
                        }
                    }
                    Err(error) => parts.push(message_kind(&error.to_string(), 3)),
                }
            }
            Err(error) => parts.push(message_kind(&error.to_string(), 4)),
        }
        let path = self.path.to_string_lossy().into_owned();
        match vmm::nv::region_listing(&path) {
            Ok(listing) => parts.push(format!("listing {}", listing.vms.len())),
            Err(error) => parts.push(format!("listing {:?}", error.kind())),
        }
        let borrowed: Vec<&[u8]> = parts.iter().map(|p| p.as_bytes()).collect();
        Ok(signature(&borrowed))
    }
}

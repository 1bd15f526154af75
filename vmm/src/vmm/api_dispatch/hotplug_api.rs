//! `vm.add-disk`, `vm.add-net` and `vm.remove-device`, answered as upstream: on a booted VM
//! (running or paused) the device is hotplugged (200 with its `PciDeviceInfo`) or the guest is
//! asked to eject it (204); on a VM created but not booted only the config changes (204); a
//! config the validation refuses is 400, an id in use 409, no VM or an unknown id 404, a device
//! that cannot be set up 500. The config (and an NV VM's stored config) lists the hotplugged
//! devices; an ejected device leaves it when the guest has ejected it, whether it was hotplugged
//! or given at boot. `vm.add-net` takes its taps as descriptors sent with the request
//! (SCM_RIGHTS), as upstream's `ch-remote add-net fd=` sends them.
//!
//! One config is the VM's: once a VM is built, its own (`Vm::config`) is changed by the device
//! changes and `Vmm::vm_config` only ever copies it ([`Vmm::adopt_vm_config`]), so the two
//! cannot diverge; without a built VM, `vm_config` is the only one.

use std::os::unix::io::{AsRawFd, IntoRawFd, OwnedFd};

use crate::api::lifecycle::{check_state, Operation, StateRefusal};
use crate::api::{ApiError, PciDeviceInfo, VmState as ApiVmState};
use crate::config::{DiskConfig, FsConfig, NetConfig, VmConfig};
use crate::vm::remove_devices_from_config;
use crate::{nv, Error};

use super::{api_error, Answer, Vmm};

/// The device of an add request.
pub(super) enum AddedDevice {
    Disk(Box<DiskConfig>),
    /// With the descriptors sent along, its taps.
    Net(Box<NetConfig>, Vec<OwnedFd>),
    Fs(Box<FsConfig>),
}

impl AddedDevice {
    fn operation(&self) -> Operation {
        match self {
            AddedDevice::Disk(_) => Operation::AddDisk,
            AddedDevice::Net(..) => Operation::AddNet,
            AddedDevice::Fs(_) => Operation::AddFs,
        }
    }

    fn id(&self) -> Option<&str> {
        match self {
            AddedDevice::Disk(disk) => disk.id.as_deref(),
            AddedDevice::Net(net, _) => net.id.as_deref(),
            AddedDevice::Fs(fs) => fs.id.as_deref(),
        }
    }

    /// Appends the device to `config` as it is.
    fn add_to(&self, config: &mut VmConfig) {
        match self {
            AddedDevice::Disk(disk) => config
                .disks
                .get_or_insert_with(Vec::new)
                .push((**disk).clone()),
            AddedDevice::Net(net, _) => config
                .net
                .get_or_insert_with(Vec::new)
                .push((**net).clone()),
            AddedDevice::Fs(fs) => config.fs.get_or_insert_with(Vec::new).push((**fs).clone()),
        }
    }
}

/// The disk and net ids `config` names.
fn config_ids(config: &VmConfig) -> impl Iterator<Item = &str> {
    let disks = config
        .disks
        .iter()
        .flatten()
        .filter_map(|d| d.id.as_deref());
    let nets = config.net.iter().flatten().filter_map(|n| n.id.as_deref());
    let fs = config.fs.iter().flatten().filter_map(|f| f.id.as_deref());
    disks.chain(nets).chain(fs)
}

impl Vmm {
    pub(super) fn api_add_device(&mut self, mut device: AddedDevice) -> Answer {
        let operation = device.operation();
        if let Err(error) = check_state(operation, self.api_state()) {
            return Answer::error(error);
        }
        let Some(config) = self.vm_config.as_ref() else {
            return Answer::error(ApiError::refused(operation, StateRefusal::NotCreated));
        };
        // As upstream: the change is validated on a copy of the config first.
        if let Some(id) = device.id() {
            if config_ids(config).any(|used| used == id) {
                return Answer::error(api_error(
                    operation,
                    Error::DuplicateDeviceId(id.to_owned()),
                ));
            }
        }
        if let AddedDevice::Net(net, files) = &mut device {
            if files.is_empty() && net.fds.is_some() {
                // Numbers in the body name descriptors of the client's process.
                return Answer::error(ApiError::failed(
                    400,
                    operation,
                    &Error::Device(
                        "fds: no descriptor came with the request; send the taps with it \
                         (SCM_RIGHTS), as ch-remote add-net fd= does, or name the tap with tap="
                            .to_owned(),
                    ),
                ));
            }
            if !files.is_empty() {
                net.fds = Some(files.iter().map(AsRawFd::as_raw_fd).collect());
            }
        }
        let mut changed = config.clone();
        device.add_to(&mut changed);
        if let Err(error) = changed.validate() {
            return Answer::error(ApiError::failed(400, operation, &error));
        }
        let booted = matches!(
            self.api_state(),
            Some(ApiVmState::Running | ApiVmState::Paused)
        );
        let Some(vm) = self.vm.as_mut().filter(|_| booted) else {
            if booted {
                // A worker holds the VM (a snapshot in progress).
                return Answer::error(ApiError::refused(operation, StateRefusal::NotRunning));
            }
            self.vm_config = Some(changed);
            // The config names the descriptors now: they stay open for the boot.
            if let AddedDevice::Net(_, files) = device {
                files.into_iter().for_each(|file| {
                    let _ = file.into_raw_fd();
                });
            }
            return Answer::done();
        };
        let added = match device {
            AddedDevice::Disk(disk) => vm.add_disk(&disk).map(|(disk, bdf)| {
                let id = disk.id.clone().unwrap_or_default();
                (AddedDevice::Disk(Box::new(disk)), id, bdf)
            }),
            AddedDevice::Net(net, files) => {
                // The hotplug takes the descriptors over (closes them if it fails).
                files.into_iter().for_each(|file| {
                    let _ = file.into_raw_fd();
                });
                vm.add_net(&net).map(|(net, bdf)| {
                    let id = net.id.clone().unwrap_or_default();
                    (AddedDevice::Net(Box::new(net), Vec::new()), id, bdf)
                })
            }
            AddedDevice::Fs(fs) => vm.add_fs(&fs).map(|(fs, bdf)| {
                let id = fs.id.clone().unwrap_or_default();
                (AddedDevice::Fs(Box::new(fs)), id, bdf)
            }),
        };
        if let (Ok((AddedDevice::Disk(_), ..)), Some(vm)) = (&added, self.vm.as_ref()) {
            // NV checkpoints undo the new disk's writes too.
            if let Err(e) = self.checkpoints.cover_new_disks(vm) {
                log::error!("the hot-added disk is not covered by NV checkpoints: {e}");
            }
        }
        match added {
            Ok((_, id, bdf)) => {
                self.adopt_vm_config();
                Answer::body(&PciDeviceInfo {
                    id,
                    bdf: bdf.to_string(),
                })
            }
            Err(e) => Answer::error(api_error(operation, e)),
        }
    }

    pub(super) fn api_remove_device(&mut self, id: &str) -> Answer {
        let operation = Operation::RemoveDevice;
        if let Err(error) = check_state(operation, self.api_state()) {
            return Answer::error(error);
        }
        if let Some(vm) = self.vm.as_ref() {
            return match vm.remove_device(id) {
                Ok(()) => Answer::done(),
                Err(e) => Answer::error(api_error(operation, e)),
            };
        }
        let Some(config) = self.vm_config.as_mut() else {
            return Answer::error(ApiError::refused(operation, StateRefusal::NotCreated));
        };
        if !config_ids(config).any(|known| known == id) {
            return Answer::error(api_error(operation, Error::UnknownDeviceId(id.to_owned())));
        }
        remove_devices_from_config(config, &[id.to_owned()]);
        Answer::done()
    }

    /// After a device activation wake-up: the devices the guest ejected leave the config (and
    /// an NV VM's stored config).
    pub(in crate::vmm) fn forget_ejected_devices(&mut self) {
        let Some(vm) = self.vm.as_mut() else {
            return;
        };
        if vm.take_ejected_devices().is_empty() {
            return;
        }
        self.adopt_vm_config();
    }

    /// After the VM changed its devices: its config becomes the one `vm.info`, a reboot and
    /// `vm_config`'s other readers see, and, for an NV VM, the one stored in its region, so a
    /// recovery builds the devices it has now.
    fn adopt_vm_config(&mut self) {
        let Some(vm) = self.vm.as_ref() else {
            return;
        };
        self.vm_config = Some(vm.config().clone());
        let Some(nv_vm) = self.nv.as_ref() else {
            return;
        };
        if let Err(e) = nv::store_config(nv_vm, vm.config()) {
            log::error!("storing the VM config after a device change: {e}");
        }
    }
}

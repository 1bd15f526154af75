//! PCI hotplug over ACPI, as upstream: `vm.add-disk` / `vm.add-net` put a virtio-pci function on
//! a free slot of segment 0, set its bit in the hotplug controller (`\_SB_.PHPR`, the
//! `devices::PciHotplugController` on the MMIO bus at `PCI_HOTPLUG_MMIO_START`) and raise the
//! GED's "PCI devices changed" event; `vm.remove-device` sets the slot's down bit and raises the
//! event; the device goes once the guest ejects it (`_EJ0` writes `B0EJ`). The eject is taken on
//! the control loop's thread: the controller wakes it through the device-activation eventfd and
//! `DeviceManager::activate_pending` removes the ejected functions.
//!
//! Hotplugged devices are saved with the VM ([`HotplugState`]): each with its config, its slot,
//! its first MSI GSI and its virtio-pci state, and a virtio-fs device with its virtiofsd's FUSE
//! state as a `--fs` one has it (`super::fs_backend_state`). A restore builds the VM from its config without
//! them ([`without_hotplugged`]) so every cold-plugged device gets the BDF and GSIs it had, then
//! puts each hotplugged one back at its slot and GSIs before the segment's state is restored.
//!
//! A device given at boot (`--disk`, `--net`, `vm.create`) is removed the same way, as upstream
//! does. Its slot, GSIs and BAR sizes are kept as a [`VacatedSlot`]: a restore builds the VM from
//! a config without it, so while the devices given at boot are built a placeholder takes each
//! vacated slot, GSIs and BARs at the point the removed device had them; every later device lands
//! where it was saved, and the placeholders go before the guest runs.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::pci::{BarKind, PciBdf, PciConfiguration, PciDevice, PciHeader};
use devices::virtio::{
    msix_vector_count, Tap, VhostUserBlkLink, VhostUserFsLink, VhostUserNetLink, VirtioDevice,
    VirtioPciDevice, VirtioPciState, VirtioTransport,
};
use devices::{PciHotplugController, PciHotplugState};
use serde::{Deserialize, Serialize};

use super::fs_backend_state::{self, BackendState};
use super::{
    connect_vhost_user_disk, connect_vhost_user_net, connect_virtio_fs, lock_or_recover,
    open_block, open_tap, DeviceManager,
};
use crate::config::{DiskConfig, FsConfig, NetConfig, VirtioTransportKind, VmConfig};
use crate::pci_segment::{KvmMsiInterrupts, PciSegment};
use crate::Error;

/// Version of [`HotplugState`] written by this build: 2 added a hotplugged virtio-fs device's
/// backend state (version 1 is still read).
pub const HOTPLUG_STATE_VERSION: u32 = 2;

/// What a hotplugged function carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HotplugKind {
    Disk(DiskConfig),
    Net(NetConfig),
    Fs(FsConfig),
}

/// A vhost-user disk, net or virtio-fs device being hotplugged, named ([`DeviceManager::prepare_vhost_user`])
/// but not connected yet. Its connection waits for the backend (up to
/// `devices::virtio::VHOST_USER_CONNECT_TIMEOUT`, then each reply's timeout): that runs on a
/// worker thread, so the control loop stays free for a power-fail save meanwhile.
pub struct PendingVhostUser {
    kind: HotplugKind,
}

/// The session [`PendingVhostUser::connect`] opened with the device's backend.
pub enum VhostUserBackend {
    Disk(VhostUserBlkLink),
    Net(VhostUserNetLink),
    Fs(VhostUserFsLink),
}

impl PendingVhostUser {
    /// Connects to the backend (client) or waits for it (server), bounded. Touches nothing of
    /// the VM: a worker thread runs it.
    pub fn connect(&self) -> Result<VhostUserBackend, Error> {
        match &self.kind {
            HotplugKind::Disk(config) => {
                connect_vhost_user_disk(config).map(VhostUserBackend::Disk)
            }
            HotplugKind::Net(config) => connect_vhost_user_net(config).map(VhostUserBackend::Net),
            HotplugKind::Fs(config) => {
                connect_virtio_fs(config.id.as_deref().unwrap_or_default(), config)
                    .map(VhostUserBackend::Fs)
            }
        }
    }

    /// The socket the backend is reached at.
    pub fn socket(&self) -> &str {
        let socket = match &self.kind {
            HotplugKind::Disk(config) => config.vhost_socket.as_deref(),
            HotplugKind::Net(config) => config.vhost_socket.as_deref(),
            HotplugKind::Fs(config) => Some(config.socket.as_str()),
        };
        socket.unwrap_or_default()
    }
}

/// One hotplugged device as saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HotplugDeviceState {
    pub id: String,
    /// Its device number on bus 0.
    pub slot: u8,
    /// The GSI of its MSI-X vector 0 (the others follow).
    pub first_gsi: u32,
    pub kind: HotplugKind,
    pub pci: VirtioPciState,
    /// A virtio-fs device's virtiofsd FUSE state, as `FsState::backend_state` (absent for
    /// other devices, when the backend does not offer DEVICE_STATE or was lost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_state: Option<BackendState>,
    /// Why a virtio-fs device's backend state is absent although the backend offers it, as
    /// `FsState::backend_state_missing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_state_missing: Option<String>,
}

/// The hotplug controller's pending bits and every hotplugged device still present.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HotplugState {
    pub version: u32,
    pub controller: PciHotplugState,
    /// MSI GSIs handed out when saved (removed devices' included: later ones keep theirs).
    pub msi_gsis_allocated: u32,
    /// In the order they were added.
    pub devices: Vec<HotplugDeviceState>,
    /// The slots devices given at boot left (absent in states saved before they could be
    /// removed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vacated: Vec<VacatedSlot>,
    /// Devices asked to go (`vm.remove-device`) that the guest had not ejected (absent in
    /// states saved before this was kept, and when there are none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removals_requested: Vec<String>,
}

/// One BAR a removed device had, by its size (where the guest put it does not matter: the
/// segment's state puts the BARs of the devices after it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VacatedBar {
    pub index: usize,
    pub kind: BarKind,
    pub size: u64,
}

/// The slot a device given at boot left when the guest ejected it: what it took from the
/// segment while the VM was built, which a restore takes again at the same point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VacatedSlot {
    /// The removed device's id (for the log).
    pub id: String,
    /// Its device number on bus 0.
    pub slot: u8,
    /// The GSI of its MSI-X vector 0 and how many it had.
    pub first_gsi: u32,
    pub vectors: u16,
    pub bars: Vec<VacatedBar>,
}

/// What a restore needs to build the devices a saved state expects from the VM's config: the
/// hotplugged devices, which it puts back from the state itself, and the slots devices given at
/// boot left.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreLayout {
    pub hotplugged: Vec<String>,
    pub vacated: Vec<VacatedSlot>,
}

/// What holds a vacated slot while a restore builds the devices given at boot: the removed
/// device's BARs, no function the guest ever sees (it goes before the vCPUs run).
struct Placeholder {
    config: PciConfiguration,
}

impl Placeholder {
    fn new(vacated: &VacatedSlot) -> Result<Self, Error> {
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: 0xffff,
            device_id: 0xffff,
            revision_id: 0,
            class: 0xff,
            subclass: 0,
            prog_if: 0,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
            interrupt_pin: 0,
        });
        for bar in &vacated.bars {
            config.add_bar(bar.index, bar.kind, bar.size).map_err(|e| {
                Error::State(format!(
                    "slot {} vacated by {}: BAR {}: {e}",
                    vacated.slot, vacated.id, bar.index
                ))
            })?;
        }
        Ok(Self { config })
    }
}

impl PciDevice for Placeholder {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
}

impl HotplugState {
    /// The ids of the hotplugged devices, which a restore builds from this state rather than
    /// from the config.
    pub fn ids(&self) -> Vec<String> {
        self.devices
            .iter()
            .map(|device| device.id.clone())
            .collect()
    }
}

/// `config` without the devices `hotplugged` names: what a restore builds the VM from before
/// it puts the hotplugged ones back from their state.
pub fn without_hotplugged(config: &VmConfig, hotplugged: &[String]) -> VmConfig {
    let mut config = config.clone();
    let keep = |id: &Option<String>| !id.as_ref().is_some_and(|id| hotplugged.contains(id));
    if let Some(disks) = config.disks.as_mut() {
        disks.retain(|disk| keep(&disk.id));
    }
    if let Some(nets) = config.net.as_mut() {
        nets.retain(|net| keep(&net.id));
    }
    if let Some(fs) = config.fs.as_mut() {
        fs.retain(|fs| keep(&fs.id));
    }
    config
}

/// A hotplugged virtio-pci function.
struct HotplugSlot {
    id: String,
    kind: HotplugKind,
    device: Arc<Mutex<VirtioPciDevice>>,
    bdf: PciBdf,
    msi: Arc<KvmMsiInterrupts>,
    /// The tap of a net device (kept for as long as the device).
    _tap: Option<Arc<Tap>>,
    /// A virtio-fs device's session with its virtiofsd, whose FUSE state the save reads.
    fs_link: Option<VhostUserFsLink>,
}

/// The hotplug controller and the hotplugged devices of one VM.
pub(super) struct Hotplug {
    controller: Arc<Mutex<PciHotplugController>>,
    slots: Mutex<Vec<HotplugSlot>>,
    /// Ids of devices the guest ejected, for the control loop to drop from the config.
    ejected: Mutex<Vec<String>>,
    /// Every slot a device given at boot left (those of earlier runs included: each restore
    /// builds the VM from its config again).
    vacated: Mutex<Vec<VacatedSlot>>,
    /// While the VM is built: the placeholders on vacated slots.
    placeholders: Mutex<Vec<PciBdf>>,
    /// Devices given at boot the guest ejected in this run: still in the device manager's
    /// lists, no longer on the bus.
    removed: Mutex<Vec<String>>,
    /// Devices `vm.remove-device` asked the guest to eject that it has not ejected yet (kept
    /// in the saved state: a recovered guest may eject them after).
    removals_requested: Mutex<Vec<String>>,
    /// For a restore: the config's entries of the hotplugged nets, whose tap (`tap=`, or `fds`
    /// handed over anew on the recovering command line) replaces the saved one.
    net_backings: Mutex<Vec<NetConfig>>,
}

impl Hotplug {
    pub fn new(controller: Arc<Mutex<PciHotplugController>>) -> Self {
        Self {
            controller,
            slots: Mutex::new(Vec::new()),
            ejected: Mutex::new(Vec::new()),
            vacated: Mutex::new(Vec::new()),
            placeholders: Mutex::new(Vec::new()),
            removed: Mutex::new(Vec::new()),
            removals_requested: Mutex::new(Vec::new()),
            net_backings: Mutex::new(Vec::new()),
        }
    }

    /// The devices asked to go that the guest has not ejected yet.
    pub fn removals_requested(&self) -> Vec<String> {
        lock_or_recover(&self.removals_requested).clone()
    }

    /// Whether device `id`, given at boot, was ejected in this run.
    pub fn is_removed(&self, id: &str) -> bool {
        lock_or_recover(&self.removed)
            .iter()
            .any(|removed| removed == id)
    }

    pub fn controller(&self) -> &Arc<Mutex<PciHotplugController>> {
        &self.controller
    }

    pub fn ids(&self) -> Vec<String> {
        lock_or_recover(&self.slots)
            .iter()
            .map(|slot| slot.id.clone())
            .collect()
    }

    /// Runs `step` on every hotplugged function; the first failure stops.
    pub fn for_each(
        &self,
        mut step: impl FnMut(&str, &mut dyn VirtioTransport) -> Result<(), Error>,
    ) -> Result<(), Error> {
        for slot in lock_or_recover(&self.slots).iter() {
            step(&slot.id, &mut *lock_or_recover(&slot.device))?;
        }
        Ok(())
    }

    /// Per-device counters, as for the cold-plugged devices.
    pub fn counters(&self) -> Vec<(String, std::collections::BTreeMap<&'static str, u64>)> {
        lock_or_recover(&self.slots)
            .iter()
            .map(|slot| (slot.id.clone(), lock_or_recover(&slot.device).counters()))
            .collect()
    }

    /// The ids of the devices ejected since the last call.
    pub fn take_ejected(&self) -> Vec<String> {
        std::mem::take(&mut *lock_or_recover(&self.ejected))
    }

    /// Removes the hotplugged functions the guest ejected (`bits`, the controller's `B0EJ`):
    /// each is paused (its requests in flight complete), taken off the segment with its BARs,
    /// ioeventfds, irqfds and routes, and dropped, which ends its I/O thread. Returns the bits of
    /// no hotplugged function.
    fn eject_hotplugged(&self, pci: &PciSegment, bits: u32) -> u32 {
        let mut slots = lock_or_recover(&self.slots);
        let mut left = bits;
        let mut index = 0;
        while index < slots.len() {
            let slot = &slots[index];
            if bits & (1u32 << slot.bdf.device) == 0 {
                index += 1;
                continue;
            }
            let slot = slots.remove(index);
            left &= !(1u32 << slot.bdf.device);
            take_off_segment(pci, &slot.id, &slot.device, slot.bdf, &slot.msi);
            lock_or_recover(&self.ejected).push(slot.id);
        }
        left
    }
}

/// Pauses an ejected function (its requests in flight complete) and takes it off the segment
/// with its BARs, ioeventfds, irqfds and routes.
fn take_off_segment(
    pci: &PciSegment,
    id: &str,
    device: &Mutex<VirtioPciDevice>,
    bdf: PciBdf,
    msi: &KvmMsiInterrupts,
) {
    if let Err(e) = lock_or_recover(device).pause() {
        log::warn!("{id}: pausing before the eject: {e}");
    }
    if let Err(e) = pci.remove_device(bdf) {
        log::error!("{id}: eject: {e}");
    }
    pci.release_msi_interrupts(msi);
    log::info!("{id} at {bdf} ejected by the guest");
}

/// Closes the tap descriptors handed over with `config` (a hotplug refused before its tap
/// took them).
fn close_handed_over(config: &NetConfig) {
    for &fd in config.fds.iter().flatten() {
        // SAFETY: the API handed these descriptors over to the hotplug, which owns them and
        // refused them before anything else took them.
        drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    }
}

/// The number of MSI-X vectors `msi` carries.
fn vector_count(msi: &KvmMsiInterrupts) -> u16 {
    (0..u16::MAX)
        .take_while(|&vector| msi.gsi(vector).is_some())
        .count() as u16
}

impl DeviceManager {
    /// Every device id in use (cold-plugged disks, nets and file systems, hotplugged, console
    /// and rng).
    fn device_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.live_disks().map(|disk| disk.id.clone()).collect();
        ids.extend(self.live_nets().map(|net| net.id.clone()));
        ids.extend(self.filesystems.iter().map(|fs| fs.id.clone()));
        ids.extend(self.console_rng.slots().map(|slot| slot.id.to_owned()));
        ids.extend(self.hotplug.ids());
        ids
    }

    /// The id a new device gets: the one given (refused when in use, as upstream), else the
    /// first free `<prefix><N>`.
    fn new_device_id(&self, given: Option<&str>, prefix: &str) -> Result<String, Error> {
        let ids = self.device_ids();
        match given {
            Some(id) if ids.iter().any(|used| used == id) => {
                Err(Error::DuplicateDeviceId(id.to_owned()))
            }
            Some(id) => Ok(id.to_owned()),
            None => Ok((0..)
                .map(|n| format!("{prefix}{n}"))
                .find(|id| !ids.contains(id))
                .unwrap_or_default()),
        }
    }

    /// Hotplugs a virtio-blk disk: a new virtio-pci function on the lowest free slot, announced
    /// to the guest. Returns the config as the VM keeps it (its id filled in) and the address.
    pub fn hotplug_disk(&self, config: &DiskConfig) -> Result<(DiskConfig, PciBdf), Error> {
        let config = self.named_disk(config)?;
        let (bdf, _) = self.plug(HotplugKind::Disk(config.clone()), None)?;
        Ok((config, bdf))
    }

    /// A hotplugged disk's config as the VM keeps it: its id filled in.
    fn named_disk(&self, config: &DiskConfig) -> Result<DiskConfig, Error> {
        if config.transport == Some(VirtioTransportKind::Mmio) {
            return Err(Error::Device(
                "a virtio-mmio disk cannot be hotplugged: there is no hotplug on virtio-mmio"
                    .to_owned(),
            ));
        }
        let mut config = config.clone();
        let id = self.new_device_id(config.id.as_deref(), "_disk")?;
        config.id = Some(id);
        Ok(config)
    }

    /// Hotplugs a virtio-net device on its tap (opened now, as for `--net`). Descriptors in
    /// `fds` are handed over: the tap owns them, or they are closed when the hotplug fails. The
    /// config returned (the VM's, and the saved state's) names a tap handed over by descriptor
    /// by its name, which a recovery opens again.
    pub fn hotplug_net(&self, config: &NetConfig) -> Result<(NetConfig, PciBdf), Error> {
        let config = self.named_net(config)?;
        match self.plug(HotplugKind::Net(config), None)? {
            (bdf, HotplugKind::Net(kept)) => Ok((kept, bdf)),
            (_, HotplugKind::Disk(_) | HotplugKind::Fs(_)) => {
                unreachable!("a net device was plugged")
            }
        }
    }

    /// A hotplugged net device's config as the VM keeps it: its id and MAC filled in. Closes
    /// the descriptors handed over when it refuses.
    fn named_net(&self, config: &NetConfig) -> Result<NetConfig, Error> {
        let refuse = |error: Error| {
            close_handed_over(config);
            Err(error)
        };
        if config.transport == Some(VirtioTransportKind::Mmio) {
            return refuse(Error::Device(
                "a virtio-mmio net device cannot be hotplugged: there is no hotplug on \
                 virtio-mmio"
                    .to_owned(),
            ));
        }
        if config.fds.as_ref().is_some_and(|fds| fds.len() > 1) {
            return refuse(Error::Device(
                "fds: several tap queue descriptors are not supported, hand over one tap \
                 descriptor with num_queues=2"
                    .to_owned(),
            ));
        }
        let mut config = config.clone();
        let id = match self.new_device_id(config.id.as_deref(), "_net") {
            Ok(id) => id,
            Err(error) => return refuse(error),
        };
        config.id = Some(id);
        config.mac.get_or_insert_with(crate::config::random_mac);
        Ok(config)
    }

    /// The first step of a vhost-user disk's, net's or virtio-fs device's hotplug, on the
    /// control loop: its config as [`Self::hotplug_disk`], [`Self::hotplug_net`] and
    /// [`Self::hotplug_fs`] name it. The connection
    /// ([`PendingVhostUser::connect`]) then runs on a worker thread, and
    /// [`Self::plug_vhost_user`] puts the device on the segment.
    pub fn prepare_vhost_user(&self, kind: &HotplugKind) -> Result<PendingVhostUser, Error> {
        let kind = match kind {
            HotplugKind::Disk(config) if config.vhost_user => {
                HotplugKind::Disk(self.named_disk(config)?)
            }
            HotplugKind::Net(config) if config.vhost_user => {
                HotplugKind::Net(self.named_net(config)?)
            }
            HotplugKind::Fs(config) => HotplugKind::Fs(self.named_fs(config)?),
            _ => {
                return Err(Error::Device(
                    "not a vhost-user disk, net or virtio-fs device".to_owned(),
                ))
            }
        };
        Ok(PendingVhostUser { kind })
    }

    /// The last step of a vhost-user hotplug, on the control loop: the device on the session
    /// `backend` opened, placed and announced as [`Self::hotplug_disk`] does. Returns its
    /// config as kept and its address.
    pub fn plug_vhost_user(
        &self,
        pending: PendingVhostUser,
        backend: VhostUserBackend,
    ) -> Result<(HotplugKind, PciBdf), Error> {
        let (bdf, kind) = self.plug_with(pending.kind, None, Some(backend))?;
        Ok((kind, bdf))
    }

    /// Hotplugs a virtio-fs device, connected to its virtiofsd now (as for `--fs`).
    pub fn hotplug_fs(&self, config: &FsConfig) -> Result<(FsConfig, PciBdf), Error> {
        let config = self.named_fs(config)?;
        let (bdf, _) = self.plug(HotplugKind::Fs(config.clone()), None)?;
        Ok((config, bdf))
    }

    /// `config` with its id, given or generated.
    fn named_fs(&self, config: &FsConfig) -> Result<FsConfig, Error> {
        let mut config = config.clone();
        config.id = Some(self.new_device_id(config.id.as_deref(), "_fs")?);
        Ok(config)
    }

    /// The disks given at boot the guest has not ejected.
    pub(super) fn live_disks(&self) -> impl Iterator<Item = &super::VirtioBlockSlot> {
        self.disks
            .iter()
            .filter(|disk| !self.hotplug.is_removed(&disk.id))
    }

    /// The nets given at boot the guest has not ejected.
    pub(super) fn live_nets(&self) -> impl Iterator<Item = &super::VirtioNetSlot> {
        self.nets
            .iter()
            .filter(|net| !self.hotplug.is_removed(&net.id))
    }

    /// The disks and nets given at boot, on virtio-pci, still on the bus: (id, transport).
    fn cold_plugged_pci(&self) -> impl Iterator<Item = (&str, &super::DiskTransport)> {
        let disks = self
            .live_disks()
            .map(|disk| (disk.id.as_str(), &disk.transport));
        let nets = self
            .live_nets()
            .map(|net| (net.id.as_str(), &net.transport));
        disks.chain(nets)
    }

    /// Asks the guest to give up device `id`, hotplugged or given at boot (its slot's down bit
    /// and the GED event); it goes when the guest ejects it.
    pub fn unplug(&self, id: &str) -> Result<(), Error> {
        let hotplugged = lock_or_recover(&self.hotplug.slots)
            .iter()
            .find(|slot| slot.id == id)
            .map(|slot| slot.bdf);
        let bdf = match hotplugged {
            Some(bdf) => bdf,
            None => match self.cold_plugged_pci().find(|(known, _)| *known == id) {
                Some((_, super::DiskTransport::Pci { bdf, .. })) => *bdf,
                Some((_, super::DiskTransport::Mmio { .. })) => {
                    return Err(Error::Device(format!(
                        "device {id:?} is on virtio-mmio, which has no hotplug: it cannot be \
                         removed"
                    )))
                }
                None if self.device_ids().iter().any(|known| known == id) => {
                    return Err(Error::Device(format!(
                        "device {id:?} cannot be removed: only disks and network devices can"
                    )))
                }
                None => return Err(Error::UnknownDeviceId(id.to_owned())),
            },
        };
        {
            let mut requested = lock_or_recover(&self.hotplug.removals_requested);
            if !requested.iter().any(|known| known == id) {
                requested.push(id.to_owned());
            }
        }
        lock_or_recover(self.hotplug.controller()).slot_down(bdf.device);
        self.notify_pci_change()
    }

    /// Removes the functions the guest ejected (the controller's `B0EJ` bits), hotplugged or
    /// given at boot. A device given at boot stays in the lists it was built into (marked
    /// removed); its slot, GSIs and BAR sizes are kept for the restores to come.
    pub(super) fn process_ejects(&self) {
        let bits = lock_or_recover(self.hotplug.controller()).take_ejected();
        if bits == 0 {
            return;
        }
        let mut left = self.hotplug.eject_hotplugged(&self.pci, bits);
        let ejected: Vec<(String, super::PciFunction)> = self
            .cold_plugged_pci()
            .filter_map(|(id, transport)| match transport {
                super::DiskTransport::Pci { device, bdf, msi }
                    if left & (1u32 << bdf.device) != 0 =>
                {
                    Some((id.to_owned(), (device.clone(), *bdf, msi.clone())))
                }
                _ => None,
            })
            .collect();
        for (id, (device, bdf, msi)) in ejected {
            left &= !(1u32 << bdf.device);
            let bars = lock_or_recover(&device)
                .config()
                .bars()
                .map(|bar| VacatedBar {
                    index: bar.index,
                    kind: bar.kind,
                    size: bar.size,
                })
                .collect();
            let vacated = VacatedSlot {
                id: id.clone(),
                slot: bdf.device,
                first_gsi: PciSegment::first_gsi(&msi).unwrap_or_default(),
                vectors: vector_count(&msi),
                bars,
            };
            take_off_segment(&self.pci, &id, &device, bdf, &msi);
            lock_or_recover(&self.hotplug.vacated).push(vacated);
            lock_or_recover(&self.hotplug.removed).push(id.clone());
            lock_or_recover(&self.hotplug.ejected).push(id);
        }
        if left != 0 {
            log::warn!("eject of slots {left:#x} ignored: no removable device there");
        }
        let ejected = lock_or_recover(&self.hotplug.ejected).clone();
        lock_or_recover(&self.hotplug.removals_requested).retain(|id| !ejected.contains(id));
    }

    /// While the devices given at boot are built for a restore (before each one and after the
    /// last): a placeholder takes each vacated slot that is the next free one, with the GSIs
    /// and BARs its device had, so the next device lands where it was saved.
    pub(super) fn fill_vacated_slots(&self) -> Result<(), Error> {
        loop {
            let occupied: Vec<u8> = self
                .pci
                .devices()
                .iter()
                .map(|device| device.bdf.device)
                .collect();
            let Some(next) = (1..devices::pci::PCI_DEVICES_PER_BUS).find(|s| !occupied.contains(s))
            else {
                return Ok(());
            };
            let vacated = lock_or_recover(&self.hotplug.vacated)
                .iter()
                .find(|vacated| vacated.slot == next)
                .cloned();
            let Some(vacated) = vacated else {
                return Ok(());
            };
            let msi = self
                .pci
                .msi_interrupts_from(Some(vacated.first_gsi), vacated.vectors)?;
            self.pci.release_msi_interrupts(&msi);
            let placeholder = Arc::new(Mutex::new(Placeholder::new(&vacated)?));
            let id = format!("(slot left by {})", vacated.id);
            let bdf = self.pci.add_device_at(&id, placeholder, Some(next))?;
            lock_or_recover(&self.hotplug.placeholders).push(bdf);
        }
    }

    /// After the devices given at boot are built: the vacated slots past the last one are
    /// taken too, then every placeholder leaves the bus (its GSIs stay handed out, as a
    /// removed device's do).
    pub(super) fn finish_vacated_slots(&self) -> Result<(), Error> {
        self.fill_vacated_slots()?;
        for bdf in std::mem::take(&mut *lock_or_recover(&self.hotplug.placeholders)) {
            self.pci.remove_device(bdf)?;
        }
        Ok(())
    }

    /// For a restore: the VM's config entries of its hotplugged nets (`config` lists them all):
    /// the tap each names, or the descriptors handed over for it, is the one it is put back on.
    pub fn set_hotplugged_net_backings(&self, config: &crate::config::VmConfig, ids: &[String]) {
        *lock_or_recover(&self.hotplug.net_backings) = config
            .net
            .iter()
            .flatten()
            .filter(|net| net.id.as_ref().is_some_and(|id| ids.contains(id)))
            .cloned()
            .collect();
    }

    /// Sets the slots earlier runs' devices given at boot left (a restore), before any device
    /// is built.
    pub(super) fn set_vacated_slots(&self, vacated: &[VacatedSlot]) {
        *lock_or_recover(&self.hotplug.vacated) = vacated.to_vec();
    }

    /// The devices the guest ejected since the last call (their ids, to drop from the config).
    pub fn take_ejected_devices(&self) -> Vec<String> {
        self.hotplug.take_ejected()
    }

    fn notify_pci_change(&self) -> Result<(), Error> {
        lock_or_recover(&self.ged)
            .notify_pci_devices_changed()
            .map_err(|e| Error::device("GED", devices::Error::GedInterrupt(e)))
    }

    /// Builds the device `kind` describes and puts it on the segment: at the lowest free slot
    /// and the next GSIs, announced to the guest, or (`restore`) at its saved slot and GSIs
    /// from its saved state, announced by nothing (the restored controller has its bits).
    /// Returns its address and `kind` as kept (a tap handed over by descriptor named).
    fn plug(
        &self,
        kind: HotplugKind,
        restore: Option<&HotplugDeviceState>,
    ) -> Result<(PciBdf, HotplugKind), Error> {
        self.plug_with(kind, restore, None)
    }

    /// [`Self::plug`], on a vhost-user session opened already when `backend` is given.
    fn plug_with(
        &self,
        mut kind: HotplugKind,
        restore: Option<&HotplugDeviceState>,
        mut backend: Option<VhostUserBackend>,
    ) -> Result<(PciBdf, HotplugKind), Error> {
        let mut fs_link = None;
        let (id, what, device, tap, thread_start): (String, String, Box<dyn VirtioDevice>, _, _) =
            match &mut kind {
                HotplugKind::Disk(config) if config.vhost_user => {
                    let link = match backend.take() {
                        Some(VhostUserBackend::Disk(link)) => link,
                        _ => connect_vhost_user_disk(config)?,
                    };
                    (
                        config.id.clone().unwrap_or_default(),
                        format!("vhost-user disk {}", link.socket().display()),
                        Box::new(link.device()),
                        None,
                        self.thread_start.clone(),
                    )
                }
                HotplugKind::Net(config) if config.vhost_user => {
                    let link = match backend.take() {
                        Some(VhostUserBackend::Net(link)) => link,
                        _ => connect_vhost_user_net(config)?,
                    };
                    (
                        config.id.clone().unwrap_or_default(),
                        format!("vhost-user net {}", link.socket().display()),
                        Box::new(link.device()),
                        None,
                        self.thread_start.clone(),
                    )
                }
                HotplugKind::Fs(config) => {
                    let id = config.id.clone().unwrap_or_default();
                    let link = match backend.take() {
                        Some(VhostUserBackend::Fs(link)) => link,
                        _ => connect_virtio_fs(&id, config)?,
                    };
                    let what = format!("virtio-fs tag {} ({})", config.tag, config.socket);
                    // Restored: virtiofsd gets the saved FUSE state before the rings start,
                    // as a `--fs` device's does.
                    let device = match restore {
                        None => link.device(),
                        Some(saved) => link.restored_device(fs_backend_state::restore(
                            &format!("virtio-fs {id}"),
                            link.socket(),
                            saved.backend_state.as_ref(),
                            saved.backend_state_missing.as_deref(),
                        )?),
                    };
                    fs_link = Some(link);
                    (id, what, Box::new(device), None, self.thread_start.clone())
                }
                HotplugKind::Disk(config) => {
                    let path = PathBuf::from(
                        config
                            .path
                            .as_deref()
                            .ok_or_else(|| Error::Device("a disk needs a path".to_owned()))?,
                    );
                    let block = open_block(&path, config.readonly)?;
                    (
                        config.id.clone().unwrap_or_default(),
                        format!("disk {}", path.display()),
                        Box::new(block),
                        None,
                        self.thread_start.clone(),
                    )
                }
                HotplugKind::Net(config) => {
                    let tap = Arc::new(open_tap(config)?);
                    if config.fds.take().is_some() {
                        // The descriptor's number means nothing to a later process; the name
                        // finds the tap again.
                        config.tap = Some(tap.name().to_owned());
                    }
                    let net = self.held_net(&tap, config)?;
                    (
                        config.id.clone().unwrap_or_default(),
                        format!(
                            "net {} (tap {})",
                            config.id.as_deref().unwrap_or(""),
                            tap.name()
                        ),
                        Box::new(net),
                        Some(tap),
                        self.net_thread_start.clone(),
                    )
                }
            };
        let msi = self.pci.msi_interrupts_from(
            restore.map(|saved| saved.first_gsi),
            msix_vector_count(&*device),
        )?;
        let state_error = |e: devices::Error| Error::device_state(what.clone(), e);
        let mut function = match restore {
            None => VirtioPciDevice::new(device, self.memory.clone(), msi.clone())
                .map_err(|e| Error::device(what.clone(), e))?,
            Some(saved) => {
                VirtioPciDevice::restore(device, self.memory.clone(), msi.clone(), &saved.pci)
                    .map_err(state_error)?
            }
        };
        self.wire_activation(&mut function, &thread_start)?;
        if restore.is_some() {
            // A device that was running starts here, paused, on this (VMM) thread.
            function.activate_pending().map_err(state_error)?;
        }
        let function = Arc::new(Mutex::new(function));
        let placed = self
            .pci
            .add_device_at(&id, function.clone(), restore.map(|saved| saved.slot));
        let bdf = match placed {
            Ok(bdf) => bdf,
            Err(e) => {
                self.pci.release_msi_interrupts(&msi);
                return Err(e);
            }
        };
        lock_or_recover(&self.hotplug.slots).push(HotplugSlot {
            id: id.clone(),
            kind: kind.clone(),
            device: function,
            bdf,
            msi,
            _tap: tap,
            fs_link,
        });
        if restore.is_none() {
            lock_or_recover(self.hotplug.controller()).slot_up(bdf.device);
            self.notify_pci_change()?;
            log::info!("{id} ({what}) hotplugged at {bdf}");
        }
        Ok((bdf, kind))
    }

    /// The hotplug controller's state and every hotplugged device's. The VM must be paused.
    pub(super) fn save_hotplug(&self) -> Result<HotplugState, Error> {
        let devices = lock_or_recover(&self.hotplug.slots)
            .iter()
            .map(|slot| {
                let pci = lock_or_recover(&slot.device)
                    .state()
                    .map_err(|e| Error::device_state(slot.id.clone(), e))?;
                // The rings are stopped (the VM is paused): virtiofsd's state is consistent.
                let (backend_state, backend_state_missing) = match &slot.fs_link {
                    Some(link) => fs_backend_state::save(&slot.id, link),
                    None => (None, None),
                };
                Ok(HotplugDeviceState {
                    id: slot.id.clone(),
                    slot: slot.bdf.device,
                    first_gsi: PciSegment::first_gsi(&slot.msi).unwrap_or_default(),
                    kind: slot.kind.clone(),
                    pci,
                    backend_state,
                    backend_state_missing,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(HotplugState {
            version: HOTPLUG_STATE_VERSION,
            controller: lock_or_recover(self.hotplug.controller()).state(),
            msi_gsis_allocated: self.pci.routing().state().allocated,
            devices,
            vacated: lock_or_recover(&self.hotplug.vacated).clone(),
            removals_requested: self.hotplug.removals_requested(),
        })
    }

    /// Puts the hotplugged devices back at their slots and GSIs from their state, and the
    /// controller's pending bits. Call before the segment's state is restored (it restores
    /// their configuration spaces with the others').
    pub(super) fn restore_hotplug(&self, state: &HotplugState) -> Result<(), Error> {
        if !(1..=HOTPLUG_STATE_VERSION).contains(&state.version) {
            return Err(Error::State(format!(
                "PCI hotplug state version {}, this build understands 1 to \
                 {HOTPLUG_STATE_VERSION}",
                state.version
            )));
        }
        let backings = std::mem::take(&mut *lock_or_recover(&self.hotplug.net_backings));
        for saved in &state.devices {
            let mut kind = saved.kind.clone();
            if let HotplugKind::Net(config) = &mut kind {
                let given = backings.iter().find(|net| net.id == config.id);
                if let Some(given) = given.filter(|n| n.fds.is_some() || n.tap.is_some()) {
                    config.tap.clone_from(&given.tap);
                    config.fds.clone_from(&given.fds);
                }
            }
            self.plug(kind, Some(saved))?;
        }
        self.pci.reserve_msi_gsis(state.msi_gsis_allocated);
        lock_or_recover(&self.hotplug.removals_requested).clone_from(&state.removals_requested);
        lock_or_recover(self.hotplug.controller())
            .restore(&state.controller)
            .map_err(|e| Error::device_state("PCI hotplug controller", e))
    }

    /// After the segment's restore: the hotplugged functions' ioeventfds where their BARs are.
    pub(super) fn refresh_hotplug_ioeventfds(&self) -> Result<(), Error> {
        let bdfs: Vec<PciBdf> = lock_or_recover(&self.hotplug.slots)
            .iter()
            .map(|slot| slot.bdf)
            .collect();
        bdfs.into_iter()
            .try_for_each(|bdf| self.pci.refresh_ioeventfds(bdf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(id: Option<&str>) -> DiskConfig {
        DiskConfig {
            path: Some("/d".to_owned()),
            id: id.map(str::to_owned),
            ..DiskConfig::default()
        }
    }

    #[test]
    fn a_restore_builds_the_cold_plugged_devices_only() {
        let config = VmConfig {
            disks: Some(vec![disk(Some("boot")), disk(None), disk(Some("hot"))]),
            net: Some(vec![NetConfig {
                id: Some("hotnet".to_owned()),
                ..NetConfig::default()
            }]),
            ..VmConfig::default()
        };
        let built = without_hotplugged(&config, &["hot".to_owned(), "hotnet".to_owned()]);
        let ids: Vec<_> = built.disks.unwrap().into_iter().map(|d| d.id).collect();
        assert_eq!(ids, [Some("boot".to_owned()), None]);
        assert!(built.net.unwrap().is_empty());
        assert_eq!(without_hotplugged(&config, &[]).disks, config.disks);
    }

    #[test]
    fn a_state_without_hotplug_loads_and_lists_no_hotplugged_device() {
        let state: crate::device_manager::DevicesState =
            serde_json::from_str(r#"{"serial":null,"disks":[]}"#).unwrap();
        assert!(state.hotplug.is_none());
        assert!(state.hotplugged_ids().is_empty());
    }
}

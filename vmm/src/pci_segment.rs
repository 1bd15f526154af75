//! PCI segment 0 as the VMM wires it: bus 0 with the host bridge at 00:00.0
//! (`devices::pci::PciBus`), the legacy configuration ports 0xCF8-0xCFF on the port bus, the
//! ECAM window on the MMIO bus, BARs allocated from the platform's windows (`arch::layout`) and
//! mapped on the buses where the guest puts them, and MSI-X routed to KVM (`GsiRouting`: one
//! GSI with an MSI route and an irqfd per vector).
//!
//! A device goes on the bus through [`PciSegment::add_device`]: it declares its BARs and
//! capabilities in its `PciConfiguration` first, takes its MSI-X sink from
//! [`PciSegment::msi_interrupts`], and is added; the segment allocates and programs its BARs,
//! maps them, registers its ioeventfds and returns its BDF. When the guest moves a BAR, the
//! segment's `BarRelocationHandler` moves the region on its bus and the ioeventfds with it,
//! then tells the device (`PciDevice::bar_moved`). See `docs/platform.md`.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use devices::pci::{
    Bar, BarKind, BarRelocation, BarRelocationHandler, MsiInterruptSink, PciBdf, PciBus,
    PciBusState, PciConfigIo, PciConfigIoState, PciConfigMmio, PciDevice, BAR_COUNT, REG_BAR0,
};
use devices::{Bus, BusDevice};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_IRQ_ROUTES,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{DeviceCause, Error};

/// Version of [`PciSegmentState`].
pub const PCI_SEGMENT_STATE_VERSION: u32 = 1;
/// Version of [`GsiRoutingState`].
pub const GSI_ROUTING_STATE_VERSION: u32 = 1;

/// Pins of the in-kernel IOAPIC, and of the two PICs together.
const IOAPIC_PINS: u32 = 24;
const PIC_PINS: u32 = 16;
/// KVM's limit on routing entries per VM, which the PICs' 16 extra entries share with the GSIs.
const MAX_GSI: u32 = KVM_MAX_IRQ_ROUTES as u32 - PIC_PINS;
/// Where an MSI goes on x86: the local APICs' window (address bits 31:20 = 0xFEE).
const MSI_ADDRESS_MASK: u64 = 0xFFFF_FFFF_FFF0_0000;
const MSI_ADDRESS_BASE: u64 = 0xFEE0_0000;

fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One MSI route: GSI `gsi` sends `data` to `address`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiRoute {
    pub gsi: u32,
    pub address: u64,
    pub data: u32,
}

/// The MSI part of KVM's routing table (the IOAPIC/PIC part is fixed), saved with the devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GsiRoutingState {
    pub version: u32,
    /// GSIs handed out to MSI vectors (from `MSI_GSI_START`), to check a restore allocated the
    /// same ones.
    pub allocated: u32,
    /// Every vector's route the guest programmed, by GSI.
    pub msi: Vec<MsiRoute>,
}

#[derive(Default)]
struct RoutingTable {
    /// GSIs allocated so far after `MSI_GSI_START`.
    allocated: u32,
    /// The guest-programmed message of each allocated GSI that has one.
    msi: BTreeMap<u32, MsiRoute>,
}

/// The whole GSI routing table of the VM: KVM_SET_GSI_ROUTING replaces all of it, so every
/// change writes the IOAPIC and PIC routes KVM sets up by default (GSI n to IOAPIC pin n for
/// n < 24 and to PIC pin n for n < 16, which COM1, the GED and the virtio-mmio devices use)
/// together with the MSI routes.
pub struct GsiRouting {
    vm_fd: Arc<VmFd>,
    table: Mutex<RoutingTable>,
}

/// The routes KVM creates with its in-kernel irqchip (arch/x86/kvm/irq_comm.c
/// `default_routing`): IOAPIC pin n for GSIs 0..24 and master/slave PIC pin n % 8 for 0..16.
pub fn default_irqchip_routes() -> Vec<kvm_irq_routing_entry> {
    let chip = |gsi: u32, irqchip: u32, pin: u32| {
        let mut entry = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        entry.u.irqchip.irqchip = irqchip;
        entry.u.irqchip.pin = pin;
        entry
    };
    let mut entries = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        entries.push(chip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < PIC_PINS {
            let pic = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            entries.push(chip(gsi, pic, gsi % 8));
        }
    }
    entries
}

fn msi_entry(route: &MsiRoute) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi: route.gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    entry.u.msi.address_lo = route.address as u32;
    entry.u.msi.address_hi = (route.address >> 32) as u32;
    entry.u.msi.data = route.data;
    entry
}

/// Whether a message to `address` reaches a local APIC. Other addresses would be memory writes
/// on real hardware; no route is installed for them and the vector's GSI then fires nothing.
fn is_msi_address(address: u64) -> bool {
    address & MSI_ADDRESS_MASK == MSI_ADDRESS_BASE
}

impl GsiRouting {
    pub fn new(vm_fd: Arc<VmFd>) -> Self {
        Self {
            vm_fd,
            table: Mutex::new(RoutingTable::default()),
        }
    }

    /// Hands out `count` consecutive GSIs for MSI vectors.
    fn allocate(&self, count: u32) -> Result<Vec<u32>, Error> {
        let mut table = lock(&self.table);
        let first = arch::layout::MSI_GSI_START + table.allocated;
        let end = first
            .checked_add(count)
            .filter(|&end| end <= MAX_GSI)
            .ok_or_else(|| {
                Error::Device(format!(
                    "no GSI left for {count} more MSI-X vectors ({} in use, KVM allows {})",
                    table.allocated, MAX_GSI
                ))
            })?;
        table.allocated += count;
        Ok((first..end).collect())
    }

    /// Hands out `count` GSIs from `first` (a restore putting a hotplugged device's vectors
    /// back where they were): they must lie above every GSI handed out so far.
    fn allocate_at(&self, first: u32, count: u32) -> Result<Vec<u32>, Error> {
        let mut table = lock(&self.table);
        let next = arch::layout::MSI_GSI_START + table.allocated;
        let end = first
            .checked_add(count)
            .filter(|&end| first >= next && end <= MAX_GSI)
            .ok_or_else(|| {
                Error::InvalidState(format!(
                    "MSI GSIs {first}+{count}: below the next free GSI {next} or beyond {MAX_GSI}"
                ))
            })?;
        table.allocated = end - arch::layout::MSI_GSI_START;
        Ok((first..end).collect())
    }

    /// Counts GSIs up to `allocated` as handed out (those of devices removed since).
    fn reserve(&self, allocated: u32) {
        let mut table = lock(&self.table);
        table.allocated = table.allocated.max(allocated);
    }

    /// Routes `gsi` to `address`/`data` (or removes its route when the address is no local
    /// APIC's) and writes the whole table to KVM.
    pub fn set_msi(&self, gsi: u32, address: u64, data: u32) -> Result<(), kvm_ioctls::Error> {
        let mut table = lock(&self.table);
        let route = MsiRoute { gsi, address, data };
        let previous = if is_msi_address(address) {
            table.msi.insert(gsi, route)
        } else {
            table.msi.remove(&gsi)
        };
        if previous == table.msi.get(&gsi).copied() {
            return Ok(());
        }
        let result = self.commit(&table);
        if result.is_err() {
            // Keep the table what KVM has.
            match previous {
                Some(previous) => table.msi.insert(gsi, previous),
                None => table.msi.remove(&gsi),
            };
        }
        result
    }

    /// The entries KVM gets: the irqchip defaults, then every MSI route.
    fn entries(table: &RoutingTable) -> Vec<kvm_irq_routing_entry> {
        let mut entries = default_irqchip_routes();
        entries.extend(table.msi.values().map(msi_entry));
        entries
    }

    fn commit(&self, table: &RoutingTable) -> Result<(), kvm_ioctls::Error> {
        let entries = Self::entries(table);
        let mut routing =
            KvmIrqRouting::new(entries.len()).map_err(|_| kvm_ioctls::Error::new(libc::ENOMEM))?;
        routing.as_mut_slice().copy_from_slice(&entries);
        self.vm_fd.set_gsi_routing(&routing)
    }

    pub fn state(&self) -> GsiRoutingState {
        let table = lock(&self.table);
        GsiRoutingState {
            version: GSI_ROUTING_STATE_VERSION,
            allocated: table.allocated,
            msi: table.msi.values().copied().collect(),
        }
    }

    /// Puts the saved MSI routes back into KVM. The VM must have allocated the same GSIs (the
    /// same devices, built in the same order).
    pub fn restore(&self, state: &GsiRoutingState) -> Result<(), Error> {
        let invalid = |reason: String| Err(Error::InvalidState(format!("GSI routes: {reason}")));
        if state.version != GSI_ROUTING_STATE_VERSION {
            return invalid(format!(
                "version {} (this build reads {GSI_ROUTING_STATE_VERSION})",
                state.version
            ));
        }
        let mut table = lock(&self.table);
        if state.allocated != table.allocated {
            return invalid(format!(
                "{} MSI GSIs saved, this VM's devices have {}",
                state.allocated, table.allocated
            ));
        }
        let first = arch::layout::MSI_GSI_START;
        let mut msi = BTreeMap::new();
        for route in &state.msi {
            if !(first..first + table.allocated).contains(&route.gsi)
                || !is_msi_address(route.address)
            {
                return invalid(format!("route {route:?} is not an allocated MSI GSI's"));
            }
            msi.insert(route.gsi, *route);
        }
        table.msi = msi;
        self.commit(&table).map_err(|source| Error::Kvm {
            operation: "KVM_SET_GSI_ROUTING (restore)",
            source,
        })
    }
}

/// The MSI-X vectors of one device in KVM: a GSI per vector, routed as the guest programs the
/// vector's table entry, and an irqfd on that GSI that `trigger` writes. Masking is the
/// device's `MsixConfig`'s: it triggers only unmasked vectors (and pending ones on unmask).
pub struct KvmMsiInterrupts {
    routing: Arc<GsiRouting>,
    vectors: Vec<(u32, EventFd)>,
}

impl KvmMsiInterrupts {
    /// The GSI of `vector`.
    pub fn gsi(&self, vector: u16) -> Option<u32> {
        self.vectors.get(usize::from(vector)).map(|(gsi, _)| *gsi)
    }

    /// The irqfd of `vector` (what `trigger` writes).
    pub fn eventfd(&self, vector: u16) -> Option<&EventFd> {
        self.vectors.get(usize::from(vector)).map(|(_, evt)| evt)
    }

    fn vector(&self, vector: u16) -> io::Result<&(u32, EventFd)> {
        self.vectors.get(usize::from(vector)).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("MSI-X vector {vector} has no GSI"),
            )
        })
    }
}

impl MsiInterruptSink for KvmMsiInterrupts {
    fn route(&self, vector: u16, address: u64, data: u32) -> io::Result<()> {
        let (gsi, _) = self.vector(vector)?;
        self.routing
            .set_msi(*gsi, address, data)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    fn trigger(&self, vector: u16) -> io::Result<()> {
        self.vector(vector)?.1.write(1)
    }
}

/// A device's ioeventfd as the segment registered it.
struct RegisteredIoEvent {
    bar: usize,
    offset: u64,
    datamatch: Option<u32>,
    evt: EventFd,
    /// Where it is registered now (`None`: its BAR is not mapped).
    at: Option<IoEventAddress>,
}

/// A BAR's region on a bus: the BAR's accesses go to the device with the BAR index.
struct PciBarRegion {
    device: Arc<Mutex<dyn PciDevice>>,
    bar: usize,
}

impl BusDevice for PciBarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.device).read_bar(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.device).write_bar(self.bar, offset, data);
    }
}

/// One device on the segment and where its BARs are mapped.
struct SegmentDevice {
    id: String,
    device: Arc<Mutex<dyn PciDevice>>,
    /// Per BAR index: the address its region is on the bus at now.
    mapped: [Option<Bar>; BAR_COUNT],
    ioevents: Vec<RegisteredIoEvent>,
}

/// The devices' BAR regions on the buses; shared with the relocation handler.
struct BarMap {
    vm_fd: Arc<VmFd>,
    pio_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    devices: BTreeMap<PciBdf, SegmentDevice>,
    /// Whether a mapped BAR's ioeventfds go into KVM now. Off while a VM is built and
    /// restored: each KVM_IOEVENTFD change waits for a KVM SRCU grace period, and a queue
    /// notify without its ioeventfd still reaches the device (a BAR write). The VM turns it on
    /// as it starts running (`PciSegment::register_ioeventfds`).
    ioevents_enabled: bool,
}

fn io_event_address(bar: &Bar, offset: u64) -> IoEventAddress {
    let address = bar.address.wrapping_add(offset);
    match bar.kind {
        BarKind::Io => IoEventAddress::Pio(address),
        _ => IoEventAddress::Mmio(address),
    }
}

fn register_ioevent(
    vm_fd: &VmFd,
    evt: &EventFd,
    at: &IoEventAddress,
    datamatch: Option<u32>,
) -> Result<(), kvm_ioctls::Error> {
    match datamatch {
        Some(value) => vm_fd.register_ioevent(evt, at, value),
        None => vm_fd.register_ioevent(evt, at, NoDatamatch),
    }
}

fn unregister_ioevent(vm_fd: &VmFd, evt: &EventFd, at: &IoEventAddress, datamatch: Option<u32>) {
    let result = match datamatch {
        Some(value) => vm_fd.unregister_ioevent(evt, at, value),
        None => vm_fd.unregister_ioevent(evt, at, NoDatamatch),
    };
    if let Err(e) = result {
        log::warn!("pci: removing an ioeventfd at {at:?}: {e}");
    }
}

impl BarMap {
    fn bus(&self, kind: BarKind) -> &Bus {
        match kind {
            BarKind::Io => &self.pio_bus,
            _ => &self.mmio_bus,
        }
    }

    /// Puts `bar` of `bdf` on its bus at `bar.address` and registers its ioeventfds there. An
    /// address of 0 is an unassigned BAR (nothing is mapped); an address that overlaps
    /// another device is logged and left unmapped, as a conflicting BAR would not decode.
    fn map(&mut self, bdf: PciBdf, bar: Bar) {
        let Some(entry) = self.devices.get(&bdf) else {
            return;
        };
        if bar.address == 0 {
            return;
        }
        let region = Arc::new(Mutex::new(PciBarRegion {
            device: Arc::clone(&entry.device),
            bar: bar.index,
        }));
        if let Err(e) = self.bus(bar.kind).insert(bar.address, bar.size, region) {
            log::warn!(
                "pci: {bdf} ({}) BAR {} at {:#x} not mapped: {e}",
                entry.id,
                bar.index,
                bar.address
            );
            return;
        }
        let vm_fd = Arc::clone(&self.vm_fd);
        let Some(entry) = self.devices.get_mut(&bdf) else {
            return;
        };
        entry.mapped[bar.index] = Some(bar);
        if !self.ioevents_enabled {
            return;
        }
        for ioevent in entry.ioevents.iter_mut().filter(|e| e.bar == bar.index) {
            let at = io_event_address(&bar, ioevent.offset);
            match register_ioevent(&vm_fd, &ioevent.evt, &at, ioevent.datamatch) {
                Ok(()) => ioevent.at = Some(at),
                Err(e) => log::warn!("pci: {bdf} ioeventfd at {at:?} not registered: {e}"),
            }
        }
    }

    /// Takes BAR `index` of `bdf` off its bus, with its ioeventfds.
    fn unmap(&mut self, bdf: PciBdf, index: usize) {
        let vm_fd = Arc::clone(&self.vm_fd);
        let Some(entry) = self.devices.get_mut(&bdf) else {
            return;
        };
        let Some(bar) = entry.mapped[index].take() else {
            return;
        };
        for ioevent in entry.ioevents.iter_mut().filter(|e| e.bar == index) {
            if let Some(at) = ioevent.at.take() {
                unregister_ioevent(&vm_fd, &ioevent.evt, &at, ioevent.datamatch);
            }
        }
        if let Err(e) = self.bus(bar.kind).remove(bar.address) {
            log::warn!("pci: {bdf} BAR {index} at {:#x}: {e}", bar.address);
        }
    }

    /// Maps every BAR of `bdf` where its configuration space says it decodes.
    fn map_all(&mut self, bdf: PciBdf) {
        let Some(entry) = self.devices.get(&bdf) else {
            return;
        };
        let bars: Vec<Bar> = lock(&entry.device).config().bars().collect();
        for bar in bars {
            self.map(bdf, bar);
        }
    }

    /// Registers every ioeventfd of a mapped BAR that is not registered yet, and registers
    /// those of BARs mapped from now on at once.
    fn enable_ioevents(&mut self) {
        self.ioevents_enabled = true;
        let vm_fd = Arc::clone(&self.vm_fd);
        for (bdf, entry) in self.devices.iter_mut() {
            for bar in entry.mapped.iter().flatten() {
                for ioevent in entry
                    .ioevents
                    .iter_mut()
                    .filter(|e| e.bar == bar.index && e.at.is_none())
                {
                    let at = io_event_address(bar, ioevent.offset);
                    match register_ioevent(&vm_fd, &ioevent.evt, &at, ioevent.datamatch) {
                        Ok(()) => ioevent.at = Some(at),
                        Err(e) => log::warn!("pci: {bdf} ioeventfd at {at:?} not registered: {e}"),
                    }
                }
            }
        }
    }

    /// Moves every BAR whose decoded address differs from where it is mapped: all the old
    /// places are vacated first, so two BARs that swapped places both land.
    fn move_changed_bars(&mut self) {
        let mut moves: Vec<(PciBdf, usize, Option<Bar>)> = Vec::new();
        for (bdf, entry) in &self.devices {
            let bars: Vec<Bar> = lock(&entry.device).config().bars().collect();
            for index in 0..BAR_COUNT {
                let wanted = bars
                    .iter()
                    .find(|bar| bar.index == index && bar.address != 0)
                    .copied();
                if entry.mapped[index] != wanted {
                    moves.push((*bdf, index, wanted));
                }
            }
        }
        for (bdf, index, _) in &moves {
            self.unmap(*bdf, *index);
        }
        for (bdf, _, wanted) in moves {
            if let Some(bar) = wanted {
                self.map(bdf, bar);
            }
        }
    }

    fn unmap_all(&mut self, bdf: PciBdf) {
        for index in 0..BAR_COUNT {
            self.unmap(bdf, index);
        }
    }

    /// Takes the device's current ioeventfd list (unregistering the old one first).
    fn refresh_ioevents(&mut self, bdf: PciBdf) -> Result<(), Error> {
        self.unmap_all(bdf);
        let Some(entry) = self.devices.get_mut(&bdf) else {
            return Ok(());
        };
        let ioevents = lock(&entry.device)
            .ioeventfds()
            .into_iter()
            .map(|e| {
                Ok(RegisteredIoEvent {
                    bar: e.bar,
                    offset: e.offset,
                    datamatch: e.datamatch,
                    evt: e.evt.try_clone().map_err(|source| Error::EventFd {
                        operation: "clone (PCI ioeventfd)",
                        source,
                    })?,
                    at: None,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        entry.ioevents = ioevents;
        self.map_all(bdf);
        Ok(())
    }
}

/// Moves a BAR's region (and its ioeventfds) when the guest reprograms the BAR. Weak: the
/// buses hold the configuration mechanisms, which hold the PCI bus, which holds this handler;
/// a strong handle on the map (which holds the buses) would keep all of them alive forever.
struct SegmentRelocation(Weak<Mutex<BarMap>>);

impl BarRelocationHandler for SegmentRelocation {
    fn relocate(&mut self, bdf: PciBdf, relocation: &BarRelocation) {
        let Some(map) = self.0.upgrade() else {
            return;
        };
        let mut map = lock(&map);
        log::debug!(
            "pci: {bdf} BAR {} moves from {:#x} to {:#x}",
            relocation.index,
            relocation.old_address,
            relocation.new_address
        );
        map.unmap(bdf, relocation.index);
        map.map(
            bdf,
            Bar {
                index: relocation.index,
                kind: relocation.kind,
                size: relocation.size,
                address: relocation.new_address,
            },
        );
        if let Some(entry) = map.devices.get(&bdf) {
            lock(&entry.device).bar_moved(relocation);
        }
    }
}

/// Bump allocation of naturally aligned BARs from one window.
struct AddressWindow {
    next: u64,
    end: u64,
}

impl AddressWindow {
    fn new(start: u64, size: u64) -> Self {
        Self {
            next: start,
            end: start.saturating_add(size),
        }
    }

    fn allocate(&mut self, size: u64) -> Option<u64> {
        let base = self.next.checked_next_multiple_of(size)?;
        let end = base.checked_add(size).filter(|&end| end <= self.end)?;
        self.next = end;
        Some(base)
    }
}

struct BarWindows {
    io: AddressWindow,
    mmio32: AddressWindow,
    mmio64: AddressWindow,
}

/// Saved state of the segment: every function's configuration space (BARs where the guest put
/// them included), the CONFIG_ADDRESS latch and the MSI routes. The devices' own state (MSI-X
/// tables, virtio) is saved by each device's owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciSegmentState {
    pub version: u32,
    pub bus: PciBusState,
    pub config_io: PciConfigIoState,
    pub gsi_routing: GsiRoutingState,
}

/// A device on the segment, for `vm.info`: its id, address and mapped BARs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciDeviceInfo {
    pub id: String,
    pub bdf: PciBdf,
    pub bars: Vec<Bar>,
}

/// PCI segment 0 of one VM.
pub struct PciSegment {
    bus: Arc<Mutex<PciBus>>,
    config_io: Arc<Mutex<PciConfigIo>>,
    bars: Arc<Mutex<BarMap>>,
    windows: Mutex<BarWindows>,
    routing: Arc<GsiRouting>,
}

impl PciSegment {
    /// Bus 0 with its host bridge, `PciConfigIo` on `pio_bus` at 0xCF8 and `PciConfigMmio` on
    /// `mmio_bus` over the ECAM window; BARs come from the I/O, 32-bit and 64-bit windows of a
    /// guest with `ram_bytes` of RAM.
    pub fn new(
        vm_fd: &Arc<VmFd>,
        pio_bus: &Arc<Bus>,
        mmio_bus: &Arc<Bus>,
        ram_bytes: u64,
    ) -> Result<Self, Error> {
        use arch::layout::*;
        let bus = Arc::new(Mutex::new(PciBus::new()));
        let bars = Arc::new(Mutex::new(BarMap {
            vm_fd: Arc::clone(vm_fd),
            pio_bus: Arc::clone(pio_bus),
            mmio_bus: Arc::clone(mmio_bus),
            devices: BTreeMap::new(),
            ioevents_enabled: true,
        }));
        lock(&bus).set_relocation_handler(Box::new(SegmentRelocation(Arc::downgrade(&bars))));
        let config_io = Arc::new(Mutex::new(PciConfigIo::new(Arc::clone(&bus))));
        pio_bus
            .insert(
                u64::from(PCI_CONFIG_PORT),
                u64::from(PCI_CONFIG_PORT_COUNT),
                config_io.clone(),
            )
            .map_err(|e| Error::device("PCI configuration ports", e))?;
        mmio_bus
            .insert(
                PCI_ECAM_START.0,
                PCI_ECAM_SIZE,
                Arc::new(Mutex::new(PciConfigMmio::new(Arc::clone(&bus)))),
            )
            .map_err(|e| Error::device("PCI ECAM window", e))?;
        let (mmio64_start, mmio64_size) = pci_mmio64_window(ram_bytes);
        Ok(Self {
            bus,
            config_io,
            bars,
            windows: Mutex::new(BarWindows {
                io: AddressWindow::new(u64::from(PCI_IO_START), u64::from(PCI_IO_SIZE)),
                mmio32: AddressWindow::new(PCI_MMIO32_START.0, PCI_MMIO32_SIZE),
                mmio64: AddressWindow::new(mmio64_start.0, mmio64_size),
            }),
            routing: Arc::new(GsiRouting::new(Arc::clone(vm_fd))),
        })
    }

    /// The VM's GSI routing table (MSI routes next to the IOAPIC's).
    pub fn routing(&self) -> &Arc<GsiRouting> {
        &self.routing
    }

    /// `vectors` MSI-X vectors in KVM, for a device's `MsixConfig`: a GSI each, with an irqfd
    /// bound to it; routed when the guest programs the vector.
    pub fn msi_interrupts(&self, vectors: u16) -> Result<Arc<KvmMsiInterrupts>, Error> {
        self.msi_interrupts_from(None, vectors)
    }

    /// As [`PciSegment::msi_interrupts`], from GSI `first` when given (a restore putting a
    /// hotplugged device back on the GSIs it had).
    pub fn msi_interrupts_from(
        &self,
        first: Option<u32>,
        vectors: u16,
    ) -> Result<Arc<KvmMsiInterrupts>, Error> {
        let gsis = match first {
            Some(first) => self.routing.allocate_at(first, u32::from(vectors))?,
            None => self.routing.allocate(u32::from(vectors))?,
        };
        let vm_fd = &lock(&self.bars).vm_fd.clone();
        let vectors = gsis
            .into_iter()
            .map(|gsi| {
                let evt = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd {
                    operation: "create (MSI-X vector)",
                    source,
                })?;
                vm_fd
                    .register_irqfd(&evt, gsi)
                    .map_err(|source| Error::Kvm {
                        operation: "KVM_IRQFD (MSI-X vector)",
                        source,
                    })?;
                Ok((gsi, evt))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Arc::new(KvmMsiInterrupts {
            routing: Arc::clone(&self.routing),
            vectors,
        }))
    }

    /// Puts `device` on bus 0 at the lowest free device number and returns its address. Every
    /// BAR its configuration declares gets an address, naturally aligned, as firmware would
    /// assign it: 64-bit memory BARs from the window above RAM, 32-bit ones from the window
    /// below 4 GiB, I/O BARs from `PCI_IO_START`; the addresses are written into its BAR
    /// registers, each BAR is mapped on the MMIO or port bus (guest accesses reach
    /// `PciDevice::read_bar`/`write_bar` with the BAR's index and the offset in it) and the
    /// device's `ioeventfds` are registered there. `id` names it in `vm.info`.
    pub fn add_device(&self, id: &str, device: Arc<Mutex<dyn PciDevice>>) -> Result<PciBdf, Error> {
        self.add_device_at(id, device, None)
    }

    /// As [`PciSegment::add_device`], at device number `slot` when given (a hotplugged device
    /// restored where it was).
    pub fn add_device_at(
        &self,
        id: &str,
        device: Arc<Mutex<dyn PciDevice>>,
        slot: Option<u8>,
    ) -> Result<PciBdf, Error> {
        let pci_error = |e| Error::device(format!("PCI device {id}"), DeviceCause::Pci(e));
        {
            let mut guard = lock(&device);
            let mut bars: Vec<Bar> = guard.config().bars().collect();
            // Largest first: each window is a bump allocator, so this wastes no alignment gap
            // within a device.
            bars.sort_by_key(|bar| std::cmp::Reverse(bar.size));
            let mut windows = lock(&self.windows);
            for bar in bars {
                let window = match bar.kind {
                    BarKind::Io => &mut windows.io,
                    BarKind::Memory32 { .. } => &mut windows.mmio32,
                    BarKind::Memory64 { .. } => &mut windows.mmio64,
                };
                let address = window.allocate(bar.size).ok_or_else(|| {
                    Error::Device(format!(
                        "PCI device {id}: no room for BAR {} ({:?}, {:#x} bytes) in its window",
                        bar.index, bar.kind, bar.size
                    ))
                })?;
                program_bar(guard.config_mut(), &bar, address);
            }
        }
        let bdf = {
            let mut bus = lock(&self.bus);
            match slot {
                Some(slot) => bus.add_device_at(slot, Arc::clone(&device)),
                None => bus.add_device(Arc::clone(&device)),
            }
        }
        .map_err(pci_error)?;
        let mut map = lock(&self.bars);
        map.devices.insert(
            bdf,
            SegmentDevice {
                id: id.to_owned(),
                device,
                mapped: [None; BAR_COUNT],
                ioevents: Vec::new(),
            },
        );
        map.refresh_ioevents(bdf)?;
        log::info!("pci: {id} at {bdf}");
        Ok(bdf)
    }

    /// Takes the device at `bdf` off the segment (hot unplug): its BARs off the buses, its
    /// ioeventfds unregistered, its slot free. Its MSI-X vectors go with
    /// [`PciSegment::release_msi_interrupts`].
    pub fn remove_device(&self, bdf: PciBdf) -> Result<(), Error> {
        {
            let mut map = lock(&self.bars);
            map.unmap_all(bdf);
            map.devices.remove(&bdf);
        }
        lock(&self.bus)
            .remove_device(bdf.device)
            .map_err(|e| Error::device(format!("PCI device {bdf}"), DeviceCause::Pci(e)))?;
        log::info!("pci: {bdf} removed");
        Ok(())
    }

    /// Unbinds a removed device's irqfds and drops its MSI routes. Its GSIs are not handed
    /// out again (a restore puts later devices on the GSIs they had).
    pub fn release_msi_interrupts(&self, msi: &KvmMsiInterrupts) {
        let vm_fd = lock(&self.bars).vm_fd.clone();
        for (gsi, evt) in &msi.vectors {
            if let Err(e) = vm_fd.unregister_irqfd(evt, *gsi) {
                log::warn!("pci: irqfd of GSI {gsi} not unregistered: {e}");
            }
            if let Err(e) = self.routing.set_msi(*gsi, 0, 0) {
                log::warn!("pci: route of GSI {gsi} not removed: {e}");
            }
        }
    }

    /// Counts the MSI GSIs up to `allocated` as handed out, before a restore of a VM whose
    /// removed devices had taken some.
    pub fn reserve_msi_gsis(&self, allocated: u32) {
        self.routing.reserve(allocated);
    }

    /// The first GSI of `msi`'s vectors (where a restore must put them again).
    pub fn first_gsi(msi: &KvmMsiInterrupts) -> Option<u32> {
        msi.vectors.first().map(|(gsi, _)| *gsi)
    }

    /// Registers `bdf`'s ioeventfds again from `PciDevice::ioeventfds` (after its eventfds
    /// changed, e.g. a restore rebuilt its queues).
    pub fn refresh_ioeventfds(&self, bdf: PciBdf) -> Result<(), Error> {
        lock(&self.bars).refresh_ioevents(bdf)
    }

    /// From now on the devices' ioeventfds stay out of KVM until `register_ioeventfds` (a VM
    /// being built and restored: its vCPUs do not run yet).
    pub fn defer_ioeventfds(&self) {
        lock(&self.bars).ioevents_enabled = false;
    }

    /// Registers the ioeventfds `defer_ioeventfds` held back, and any later ones at once.
    /// Idempotent.
    pub fn register_ioeventfds(&self) {
        lock(&self.bars).enable_ioevents();
    }

    /// The devices on the segment (the host bridge is not listed), with their mapped BARs.
    pub fn devices(&self) -> Vec<PciDeviceInfo> {
        lock(&self.bars)
            .devices
            .iter()
            .map(|(bdf, entry)| PciDeviceInfo {
                id: entry.id.clone(),
                bdf: *bdf,
                bars: entry.mapped.iter().flatten().copied().collect(),
            })
            .collect()
    }

    /// Every function on bus 0, host bridge first.
    pub fn functions(&self) -> Vec<PciBdf> {
        lock(&self.bus).functions().collect()
    }

    /// Saves the configuration spaces, the CONFIG_ADDRESS latch and the MSI routes. The VM must
    /// be paused.
    pub fn save_state(&self) -> Result<PciSegmentState, Error> {
        let bus = lock(&self.bus)
            .state()
            .map_err(|e| Error::device_state("PCI bus", DeviceCause::Pci(e)))?;
        Ok(PciSegmentState {
            version: PCI_SEGMENT_STATE_VERSION,
            bus,
            config_io: lock(&self.config_io).state(),
            gsi_routing: self.routing.state(),
        })
    }

    /// Restores what `save_state` saved into a segment with the same devices, then maps every
    /// BAR where the restored configuration says it decodes and registers the devices' current
    /// ioeventfds there. Restore each device's own state (its MSI-X, its queues) before or
    /// after; call `refresh_ioeventfds` if that replaced its eventfds.
    pub fn restore_state(&self, state: &PciSegmentState) -> Result<(), Error> {
        if state.version != PCI_SEGMENT_STATE_VERSION {
            return Err(Error::InvalidState(format!(
                "PCI segment state version {} (this build reads {PCI_SEGMENT_STATE_VERSION})",
                state.version
            )));
        }
        let restored = lock(&self.bus)
            .restore(&state.bus)
            .map_err(|e| Error::device_state("PCI bus", DeviceCause::Pci(e)));
        // Whatever happened, each BAR goes where the configuration now says. Only a BAR that
        // moved is taken off and put back: one that stays keeps its bus region and ioeventfds
        // (every KVM_IOEVENTFD change waits for a KVM SRCU grace period, milliseconds on a busy
        // host, on the recovery path).
        lock(&self.bars).move_changed_bars();
        restored?;
        lock(&self.config_io)
            .restore(&state.config_io)
            .map_err(|e| Error::device_state("PCI configuration ports", DeviceCause::Pci(e)))?;
        self.routing.restore(&state.gsi_routing)
    }
}

/// Writes `address` into `bar`'s register(s), as firmware assigning it would.
fn program_bar(config: &mut devices::pci::PciConfiguration, bar: &Bar, address: u64) {
    let register = REG_BAR0 + 4 * bar.index as u16;
    config.write(register, &(address as u32).to_le_bytes());
    if matches!(bar.kind, BarKind::Memory64 { .. }) {
        config.write(register + 4, &((address >> 32) as u32).to_le_bytes());
    }
}

#[cfg(test)]
mod tests;

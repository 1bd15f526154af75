//! vCPUs: one thread each, running KVM_RUN and dispatching its exits, parked and woken by the
//! control loop (pause/resume) through a shared run control.
//!
//! Pausing: the control loop sets the request to `Pause` and sends each vCPU thread the kick
//! signal (a real-time signal with a no-op-ish handler). The handler sets `immediate_exit` in the
//! thread's `kvm_run`, so whether the thread is inside KVM_RUN (interrupted with EINTR) or about to
//! enter it (KVM returns EINTR at once), the next KVM_RUN returns EINTR. A thread parks only after
//! such an EINTR return: KVM_RUN completes a pending port-I/O or MMIO read into the guest's
//! registers before it honours `immediate_exit`, so a parked vCPU never has half-done I/O and
//! its registers can be saved as they are.

use std::cell::Cell;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_run, kvm_sregs, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, SyncReg, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::config::SeccompMode;
use crate::events::VmEvents;
use crate::seccomp_filters::{apply_filter_for_mode, ThreadKind};
use crate::Error;

mod whereabouts;
use whereabouts::{Step, Whereabouts};

/// How long `pause` waits for every vCPU to leave KVM_RUN before it gives up.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// KVM system event types (`KVM_SYSTEM_EVENT_*` in the KVM API).
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run` page, for the kick signal handler. Null outside vCPU threads.
    static KVM_RUN_OF_THIS_THREAD: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick_signal(
    _signal: libc::c_int,
    _info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    let run = KVM_RUN_OF_THIS_THREAD.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is set by the vCPU thread to its own `kvm_run` mapping, which lives
        // as long as the VcpuFd the thread holds, and is reset to null before the thread ends. A
        // one-byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick signal handler, once per process.
pub fn install_kick_signal_handler() -> Result<(), Error> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(kick_signal(), handle_kick_signal)
            .map_err(Error::SignalHandler);
    });
    result
}

/// Where vCPU threads send the port I/O and MMIO accesses the guest makes (the device buses).
pub trait IoHandler: Send + Sync {
    fn pio_read(&self, port: u16, data: &mut [u8]);
    fn pio_write(&self, port: u16, data: &[u8]);
    fn mmio_read(&self, address: u64, data: &mut [u8]);
    fn mmio_write(&self, address: u64, data: &[u8]);
}

/// One KVM vCPU. Its fd is behind a mutex: the vCPU thread holds it for each KVM_RUN, the control
/// loop for reading and writing state while the vCPU is parked.
#[derive(Debug)]
pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    /// KVM copies the registers and special registers into `kvm_run` at every return from
    /// KVM_RUN (KVM_CAP_SYNC_REGS), the kick's EINTR included: a parked vCPU's are read there,
    /// without the two ioctls (each pays KVM's `vcpu_load`, about 5 us on this host).
    copies_registers: bool,
    /// The copy in `kvm_run` is the vCPU's state: set by each KVM_RUN, cleared whenever the
    /// control loop takes the vCPU in a way that may change it ([`VcpuManager::lock_vcpu`]).
    registers_copied: bool,
}

/// The sync-register fields KVM copies out for us (see [`Vcpu::copied_registers`]). The vCPU
/// events are not among them: an NMI can be queued for a parked vCPU after its last exit (an
/// IOAPIC pin in NMI mode raised while a checkpoint quiesces the devices), so they are read
/// with their ioctl after the quiesce.
const COPIED_REGISTERS: [SyncReg; 2] = [SyncReg::Register, SyncReg::SystemRegister];

/// Whether this host's KVM copies every field of [`COPIED_REGISTERS`] out at each exit.
fn copies_registers(vm_fd: &VmFd) -> bool {
    let offered = u64::try_from(vm_fd.check_extension_int(Cap::SyncRegs)).unwrap_or(0);
    COPIED_REGISTERS
        .iter()
        .all(|&field| offered & field as u64 != 0)
}

impl Vcpu {
    /// Creates vCPU `id` with its CPUID: the host's supported set (see [`supported_cpuid`])
    /// with this vCPU's APIC ID.
    pub fn new(vm_fd: &VmFd, id: u8, vcpu_count: u8, supported: &CpuId) -> Result<Vcpu, Error> {
        let kvm_error = |operation| {
            move |source| Error::VcpuKvm {
                vcpu: id,
                operation,
                source,
            }
        };
        let mut fd = vm_fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_error("KVM_CREATE_VCPU"))?;
        let mut cpuid = supported.clone();
        set_apic_id(&mut cpuid, id, vcpu_count);
        fd.set_cpuid2(&cpuid).map_err(kvm_error("KVM_SET_CPUID2"))?;
        let copies_registers = copies_registers(vm_fd);
        if copies_registers {
            for field in COPIED_REGISTERS {
                fd.set_sync_valid_reg(field);
            }
        }
        Ok(Vcpu {
            id,
            fd,
            copies_registers,
            registers_copied: false,
        })
    }

    /// The registers and special registers as KVM copied them out at the vCPU's last return
    /// from KVM_RUN, if that copy is still its state: nothing took the vCPU to change it since
    /// (see [`VcpuManager::lock_vcpu`]). A parked vCPU returned from KVM_RUN last (the kick's
    /// EINTR, after KVM completed any pending I/O into the registers), so for it this equals
    /// KVM_GET_REGS and KVM_GET_SREGS.
    pub fn copied_registers(&self) -> Option<(kvm_regs, kvm_sregs)> {
        if !self.registers_copied {
            return None;
        }
        let copy = self.fd.sync_regs();
        Some((copy.regs, copy.sregs))
    }

    /// One KVM_RUN and the handling of its exit: port I/O and MMIO are served in place, on this
    /// thread; everything else stops or interrupts the run.
    fn run_once(&mut self, io: &dyn IoHandler) -> RunOutcome {
        let exit = self.fd.run();
        // KVM copies the registers out on every way out of KVM_RUN (its `store_regs`).
        self.registers_copied = self.copies_registers;
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => io.pio_read(port, data),
            Ok(VcpuExit::IoOut(port, data)) => io.pio_write(port, data),
            Ok(VcpuExit::MmioRead(address, data)) => io.mmio_read(address, data),
            Ok(VcpuExit::MmioWrite(address, data)) => io.mmio_write(address, data),
            Ok(exit) => {
                return match exit {
                    // With the in-kernel LAPIC, KVM handles HLT itself; seeing it here means the guest
                    // halted with nothing that could wake it: treat it as a power-off.
                    VcpuExit::Hlt => RunOutcome::Stop(StopReason::Shutdown("HLT exit".into())),
                    // A triple fault. Real hardware resets; so does upstream. It is a guest crash,
                    // told apart from a requested reset (see `VmEvents::signal_triple_fault`).
                    VcpuExit::Shutdown => RunOutcome::Stop(StopReason::TripleFault(format!(
                        "KVM_EXIT_SHUTDOWN{}",
                        self.describe_rip()
                    ))),
                    VcpuExit::SystemEvent(kind, data) => match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => {
                            RunOutcome::Stop(StopReason::Shutdown("system event SHUTDOWN".into()))
                        }
                        KVM_SYSTEM_EVENT_RESET => {
                            RunOutcome::Stop(StopReason::Reset("system event RESET".into()))
                        }
                        KVM_SYSTEM_EVENT_CRASH => RunOutcome::Stop(StopReason::Failed(format!(
                            "guest crashed (system event CRASH, data {data:x?})"
                        ))),
                        other => RunOutcome::Stop(StopReason::Failed(format!(
                            "unknown system event {other} (data {data:x?})"
                        ))),
                    },
                    VcpuExit::InternalError => {
                        // SAFETY: KVM_EXIT_INTERNAL_ERROR tells us `internal` is the valid union member.
                        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
                        let data_count = (internal.ndata as usize).min(internal.data.len());
                        RunOutcome::Stop(StopReason::Failed(format!(
                            "KVM internal error, suberror {} ({}), data {:x?}{}",
                            internal.suberror,
                            internal_error_name(internal.suberror),
                            &internal.data[..data_count],
                            self.describe_rip()
                        )))
                    }
                    VcpuExit::FailEntry(reason, cpu) => {
                        RunOutcome::Stop(StopReason::Failed(format!(
                            "VM entry failed: hardware reason {reason:#x} on host cpu {cpu}{}",
                            self.describe_rip()
                        )))
                    }
                    VcpuExit::Intr => RunOutcome::Interrupted,
                    other => {
                        let exit = format!("{other:?}");
                        RunOutcome::Stop(StopReason::Failed(format!(
                            "unhandled exit {exit}{}",
                            self.describe_rip()
                        )))
                    }
                };
            }
            Err(error) if error.errno() == libc::EINTR || error.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return RunOutcome::Interrupted;
            }
            Err(error) => {
                return RunOutcome::Stop(StopReason::Failed(format!("KVM_RUN failed: {error}")))
            }
        }
        RunOutcome::Continue
    }

    /// The guest's instruction pointer, for error messages.
    fn describe_rip(&self) -> String {
        match self.fd.get_regs() {
            Ok(regs) => format!(" at rip {:#x}", regs.rip),
            Err(_) => String::new(),
        }
    }
}

fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
        kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
        _ => "unknown suberror",
    }
}

/// Puts `apic_id` where the guest reads its own APIC ID: CPUID.1 EBX[31:24] and the x2APIC ID in
/// EDX of the topology leaves 0xB and 0x1F. Also states the logical processor count in leaf 1.
fn set_apic_id(cpuid: &mut CpuId, apic_id: u8, vcpu_count: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (u32::from(apic_id) << 24)
                    | (u32::from(vcpu_count) << 16);
            }
            0xb | 0x1f => entry.edx = u32::from(apic_id),
            _ => {}
        }
    }
}

enum RunOutcome {
    Continue,
    /// KVM_RUN returned EINTR: a kick (pause/stop) or a stray signal.
    Interrupted,
    Stop(StopReason),
}

enum StopReason {
    Shutdown(String),
    Reset(String),
    TripleFault(String),
    Failed(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

#[derive(Debug)]
struct RunState {
    request: Request,
    /// vCPU threads currently not running guest code (parked, or stopped after a terminal exit).
    parked: usize,
    /// How many parked threads the control loop waits for ([`VcpuManager::pause`]): the thread
    /// that completes the count wakes it, the others do not.
    awaited: usize,
}

/// What the control loop asks of the vCPU threads, and how many of them have complied.
#[derive(Debug)]
struct RunControl {
    state: Mutex<RunState>,
    /// The request changed: the vCPU threads wait on this.
    changed: Condvar,
    /// Enough threads parked: the control loop waits on this. A separate condition, so that a
    /// thread parking wakes neither the threads parked before it nor, until the last one, the
    /// control loop (each wake-up takes one of the host's cores for a moment in the pause).
    parked_changed: Condvar,
}

impl RunControl {
    fn new(request: Request) -> RunControl {
        RunControl {
            state: Mutex::new(RunState {
                request,
                parked: 0,
                awaited: 0,
            }),
            changed: Condvar::new(),
            parked_changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, RunState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Parks the calling vCPU thread while a pause is requested; returns what to do next
    /// (`Run` or `Stop`).
    fn wait_while_paused(&self) -> Request {
        let mut state = self.lock();
        if state.request == Request::Pause {
            state.parked += 1;
            self.note_parked(&state);
            while state.request == Request::Pause {
                state = self
                    .changed
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            state.parked -= 1;
        }
        state.request
    }

    /// Asks every vCPU thread to park, has `kick` get them out of KVM_RUN, and waits up to
    /// `timeout` for `expected` of them to park; on timeout returns how many did. A pause that
    /// timed out is withdrawn (the caller reports the VM still running): the threads that
    /// parked run on, and one that reaches its park point late does not stop there.
    fn pause(&self, expected: usize, timeout: Duration, kick: impl FnOnce()) -> Result<(), usize> {
        self.lock().request = Request::Pause;
        kick();
        self.wait_for_parked(expected, timeout).inspect_err(|_| {
            let mut state = self.lock();
            if state.request == Request::Pause {
                state.request = Request::Run;
                self.changed.notify_all();
            }
        })
    }

    /// Waits up to `timeout` until `expected` vCPU threads are parked; on timeout returns how
    /// many are.
    fn wait_for_parked(&self, expected: usize, timeout: Duration) -> Result<(), usize> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        state.awaited = expected;
        while state.parked < expected {
            let now = Instant::now();
            if now >= deadline {
                return Err(state.parked);
            }
            state = self
                .parked_changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        Ok(())
    }

    fn note_parked(&self, state: &RunState) {
        if state.parked >= state.awaited {
            self.parked_changed.notify_all();
        }
    }

    /// A vCPU that cannot run any more waits here, counted as parked, until the VM is torn down.
    fn park_until_stop(&self) {
        let mut state = self.lock();
        state.parked += 1;
        self.note_parked(&state);
        while state.request != Request::Stop {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

/// The CPUID the host's KVM supports, the base of every vCPU's. A system ioctl that needs no VM:
/// the VM build fetches it on a helper thread while it creates the VM (on a nested host every
/// `cpuid` the kernel executes for it traps to the outer hypervisor, about 0.3 ms in all here).
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| Error::Kvm {
            operation: "KVM_GET_SUPPORTED_CPUID",
            source,
        })
}

/// The vCPUs of one VM and their threads.
pub struct VcpuManager {
    vcpus: Vec<Arc<Mutex<Vcpu>>>,
    threads: Vec<JoinHandle<()>>,
    /// Where each thread of `threads` is, for the error of a pause that timed out.
    whereabouts: Vec<Arc<Whereabouts>>,
    control: Arc<RunControl>,
    /// A power-fail save is under way: a pause raises each kicked vCPU thread's priority
    /// (`power_fail_priority`).
    power_fail_priority: std::sync::atomic::AtomicBool,
}

impl VcpuManager {
    /// Creates `count` vCPUs with the host's `supported` CPUID ([`supported_cpuid`]). Their
    /// threads start with `start_paused`.
    pub fn new(
        kvm: &Kvm,
        vm_fd: &VmFd,
        count: u8,
        supported: &CpuId,
    ) -> Result<VcpuManager, Error> {
        let max = kvm.get_max_vcpus();
        if count == 0 || usize::from(count) > max {
            return Err(Error::TooManyVcpus { vcpus: count, max });
        }
        let vcpus = (0..count)
            .map(|id| Vcpu::new(vm_fd, id, count, supported).map(|v| Arc::new(Mutex::new(v))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VcpuManager {
            vcpus,
            threads: Vec::new(),
            whereabouts: Vec::new(),
            // Threads start parked (`start_paused`).
            control: Arc::new(RunControl::new(Request::Pause)),
            power_fail_priority: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether the next pause runs the kicked vCPU threads at real-time priority (a power-fail
    /// save, see `power_fail_priority`); `false` also gives them their normal policy back.
    pub fn set_power_fail_priority(&self, raised: bool) {
        self.power_fail_priority
            .store(raised, std::sync::atomic::Ordering::Relaxed);
        if !raised {
            crate::power_fail_priority::set_vcpu_threads(&self.threads, false);
        }
    }

    pub fn count(&self) -> usize {
        self.vcpus.len()
    }

    /// Locks vCPU `index` for reading or writing its state. Only meaningful while paused. The
    /// registers KVM copied out at its last exit no longer count as its state (the caller may
    /// set them): [`Vcpu::copied_registers`] answers `None` until it runs again.
    pub fn lock_vcpu(&self, index: usize) -> MutexGuard<'_, Vcpu> {
        let mut vcpu = self.lock_vcpu_unchanged(index);
        vcpu.registers_copied = false;
        vcpu
    }

    /// Locks vCPU `index` for reading its state, or for calls that do not change its
    /// registers (a state save, KVMCLOCK_CTRL): the copy of its last exit stays valid.
    pub fn lock_vcpu_unchanged(&self, index: usize) -> MutexGuard<'_, Vcpu> {
        self.vcpus[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Spawns one thread per vCPU; they stay parked until `resume`.
    pub fn start_paused(
        &mut self,
        io: Arc<dyn IoHandler>,
        events: Arc<VmEvents>,
        seccomp: SeccompMode,
    ) -> Result<(), Error> {
        let count = u8::try_from(self.vcpus.len()).unwrap_or(u8::MAX);
        let threads = VcpuThreads::spawn(count, events, seccomp)?;
        self.start_on(threads, io)?;
        self.control
            .wait_for_parked(self.threads.len(), PAUSE_TIMEOUT)
            .map_err(|parked| self.pause_timeout(parked))
    }

    /// Gives each vCPU to its thread of `threads` (started before the vCPUs existed, see
    /// [`VcpuThreads`]); they park until `resume`. Does not wait for them to park: `resume`
    /// releases a thread wherever it is on its way, and `pause` waits for every one.
    pub fn start_on(
        &mut self,
        mut threads: VcpuThreads,
        io: Arc<dyn IoHandler>,
    ) -> Result<(), Error> {
        if !self.threads.is_empty() {
            return Err(Error::State("the vCPU threads were started already".into()));
        }
        if threads.handovers.len() != self.vcpus.len() {
            return Err(Error::State(format!(
                "{} vCPU threads were started for {} vCPUs",
                threads.handovers.len(),
                self.vcpus.len()
            )));
        }
        self.control = Arc::clone(&threads.control);
        for (vcpu, handover) in self.vcpus.iter().zip(threads.handovers.drain(..)) {
            // A send fails only if the thread is gone (it cannot end before its hand-over but
            // by a panic); its `pause` then times out and says so.
            let _ = handover.send(Handover {
                vcpu: Arc::clone(vcpu),
                io: Arc::clone(&io),
            });
        }
        self.threads = std::mem::take(&mut threads.threads);
        self.whereabouts = std::mem::take(&mut threads.whereabouts);
        Ok(())
    }

    /// Kicks every vCPU out of KVM_RUN and waits until all are parked. On timeout the vCPUs run
    /// on (see `RunControl::pause`).
    pub fn pause(&self) -> Result<(), Error> {
        self.control
            .pause(self.threads.len(), PAUSE_TIMEOUT, || {
                self.kick_all();
                if self
                    .power_fail_priority
                    .load(std::sync::atomic::Ordering::Relaxed)
                {
                    // After the kick, never before: see `power_fail_priority`.
                    crate::power_fail_priority::set_vcpu_threads(&self.threads, true);
                }
            })
            .map_err(|parked| self.pause_timeout(parked))
    }

    /// The error of a wait for parked vCPUs that timed out with `parked` of them parked: it says
    /// where each thread was (see `whereabouts`).
    fn pause_timeout(&self, parked: usize) -> Error {
        let threads = self
            .whereabouts
            .iter()
            .enumerate()
            // vCPU ids are their indices (`VcpuManager::new`).
            .map(|(id, whereabouts)| whereabouts.describe(id as u8))
            .collect::<Vec<_>>()
            .join("; ");
        Error::PauseTimeout {
            parked,
            total: self.threads.len(),
            timeout_ms: PAUSE_TIMEOUT.as_millis() as u64,
            threads,
        }
    }

    /// Tells a kvmclock guest that its vCPUs were stopped by the host (KVM_KVMCLOCK_CTRL), so
    /// its watchdogs do not mistake the pause for a soft lockup. Guests that have not set up
    /// kvmclock (EINVAL) need no notice.
    pub fn notify_guest_clock_paused(&self) {
        for index in 0..self.vcpus.len() {
            let vcpu = self.lock_vcpu_unchanged(index);
            if let Err(e) = vcpu.fd.kvmclock_ctrl() {
                if e.errno() != libc::EINVAL {
                    log::debug!("vCPU {}: KVM_KVMCLOCK_CTRL: {e}", vcpu.id);
                }
            }
        }
    }

    /// Lets the parked vCPUs run again.
    pub fn resume(&self) {
        self.control.lock().request = Request::Run;
        self.control.changed.notify_all();
    }

    /// Stops and joins every vCPU thread. Idempotent.
    pub fn stop(&mut self) {
        self.control.lock().request = Request::Stop;
        self.control.changed.notify_all();
        self.kick_all();
        for thread in self.threads.drain(..) {
            let name = thread.thread().name().unwrap_or("vcpu").to_string();
            if thread.join().is_err() {
                log::error!("{name} thread panicked");
            }
        }
    }

    fn kick_all(&self) {
        for thread in &self.threads {
            if let Err(e) = thread.kill(kick_signal()) {
                // The thread has already ended (e.g. after a terminal exit): nothing to kick.
                log::debug!("kicking {:?}: {e}", thread.thread().name());
            }
        }
    }
}

impl Drop for VcpuManager {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a vCPU thread gets once its vCPU exists: the vCPU and where its exits go.
struct Handover {
    vcpu: Arc<Mutex<Vcpu>>,
    io: Arc<dyn IoHandler>,
}

/// vCPU threads started before their vCPUs exist. Each installs its seccomp filter, then waits
/// for its vCPU ([`VcpuManager::start_on`]). An NV recovery starts them while KVM registers
/// the guest RAM on another thread, so the thread starts and the filter installs overlap that
/// wait instead of following the vCPUs' creation. Dropped without a hand-over (the VM was not
/// built), the threads end and are joined.
pub struct VcpuThreads {
    control: Arc<RunControl>,
    handovers: Vec<Sender<Handover>>,
    threads: Vec<JoinHandle<()>>,
    /// Where each of `threads` is (see `whereabouts`).
    whereabouts: Vec<Arc<Whereabouts>>,
}

impl std::fmt::Debug for VcpuThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuThreads")
            .field("threads", &self.threads.len())
            .finish_non_exhaustive()
    }
}

impl VcpuThreads {
    /// Spawns threads `vcpu0`..`vcpu<count-1>` under the vCPU seccomp filter of `seccomp`.
    pub fn spawn(
        count: u8,
        events: Arc<VmEvents>,
        seccomp: SeccompMode,
    ) -> Result<VcpuThreads, Error> {
        install_kick_signal_handler()?;
        let mut threads = VcpuThreads {
            control: Arc::new(RunControl::new(Request::Pause)),
            handovers: Vec::with_capacity(usize::from(count)),
            threads: Vec::with_capacity(usize::from(count)),
            whereabouts: Vec::with_capacity(usize::from(count)),
        };
        for id in 0..count {
            let (handover, handed_over) = channel();
            let control = Arc::clone(&threads.control);
            let events = Arc::clone(&events);
            let whereabouts = Arc::new(Whereabouts::default());
            threads.whereabouts.push(Arc::clone(&whereabouts));
            // On an error, `threads` is dropped: the ones started so far end.
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu_thread(id, handed_over, control, events, seccomp, &whereabouts))
                .map_err(|source| Error::ThreadSpawn {
                    thread: format!("vcpu{id}"),
                    source,
                })?;
            threads.handovers.push(handover);
            threads.threads.push(thread);
        }
        Ok(threads)
    }

    /// Waits until every thread is past its filter's installation (whether it succeeded or
    /// not); returns their kernel thread ids.
    #[cfg(test)]
    fn wait_until_ready(&self) -> Vec<libc::pid_t> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready: Vec<libc::pid_t> = self
                .whereabouts
                .iter()
                .filter(|whereabouts| whereabouts.step() == Step::WaitingForVcpu)
                .filter_map(|whereabouts| whereabouts.tid())
                .collect();
            if ready.len() == self.threads.len() {
                return ready;
            }
            assert!(
                Instant::now() < deadline,
                "vCPU threads not ready: {ready:?}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for VcpuThreads {
    fn drop(&mut self) {
        // Without their senders the threads waiting for a vCPU end.
        self.handovers.clear();
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                log::error!("a vCPU thread panicked before it had its vCPU");
            }
        }
    }
}

fn vcpu_thread(
    id: u8,
    handed_over: Receiver<Handover>,
    control: Arc<RunControl>,
    events: Arc<VmEvents>,
    seccomp: SeccompMode,
    whereabouts: &Whereabouts,
) {
    whereabouts.started();
    // Before the thread has its vCPU, so guest-triggered exits are only ever served under the
    // filter.
    let filtered = apply_filter_for_mode(ThreadKind::Vcpu, seccomp);
    whereabouts.reached(Step::WaitingForVcpu);
    let Ok(Handover { vcpu, io }) = handed_over.recv() else {
        // The VM was not built: there is nothing to run.
        whereabouts.reached(Step::Ended);
        return;
    };
    drop(handed_over);
    if let Err(e) = filtered {
        events.signal_vcpu_failure(id, format!("installing the seccomp filter: {e}"));
        whereabouts.reached(Step::Ended);
        control.park_until_stop();
        return;
    }
    {
        let mut guard = vcpu.lock().unwrap_or_else(|p| p.into_inner());
        let run: *mut kvm_run = guard.fd.get_kvm_run();
        KVM_RUN_OF_THIS_THREAD.with(|cell| cell.set(run));
    }

    whereabouts.reached(Step::AtParkPoint);
    let mut next = control.wait_while_paused();
    whereabouts.reached(Step::Running);
    while next == Request::Run {
        let outcome = vcpu
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .run_once(io.as_ref());
        match outcome {
            RunOutcome::Continue => {}
            RunOutcome::Interrupted => {
                whereabouts.reached(Step::AtParkPoint);
                next = control.wait_while_paused();
                whereabouts.reached(Step::Running);
            }
            RunOutcome::Stop(reason) => {
                match reason {
                    StopReason::Shutdown(why) => {
                        log::info!("vCPU {id}: guest power-off ({why})");
                        events.signal_shutdown();
                    }
                    StopReason::Reset(why) => {
                        log::info!("vCPU {id}: guest reset ({why})");
                        events.signal_reset();
                    }
                    StopReason::TripleFault(why) => {
                        log::warn!("vCPU {id}: guest triple fault ({why})");
                        events.signal_triple_fault();
                    }
                    StopReason::Failed(why) => events.signal_vcpu_failure(id, why),
                }
                whereabouts.reached(Step::Ended);
                control.park_until_stop();
                break;
            }
        }
    }
    whereabouts.reached(Step::Ended);
    KVM_RUN_OF_THIS_THREAD.with(|cell| cell.set(std::ptr::null_mut()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    struct NoDevices;

    impl IoHandler for NoDevices {
        fn pio_read(&self, _port: u16, _data: &mut [u8]) {}
        fn pio_write(&self, _port: u16, _data: &[u8]) {}
        fn mmio_read(&self, _address: u64, _data: &mut [u8]) {}
        fn mmio_write(&self, _address: u64, _data: &[u8]) {}
    }

    /// A parked vCPU's registers as KVM copied them out at its kick equal what KVM_GET_REGS and
    /// KVM_GET_SREGS read, after it ran; once the control loop took it to change it, the copy
    /// is not offered until it runs again. (On a host without KVM_CAP_SYNC_REGS nothing is
    /// copied and the save reads both with their ioctls.)
    #[test]
    fn a_parked_vcpus_copied_registers_are_its_registers_until_it_is_changed() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let entry = arch::BootEntry {
            protocol: arch::BootProtocol::Pvh,
            entry: GuestAddress(0x10_0000),
            boot_info: GuestAddress(0),
        };
        // inc eax; jmp back to it.
        memory
            .write_slice(&[0x40, 0xeb, 0xfd], entry.entry)
            .unwrap();
        let kvm_vm = crate::kvm_vm::KvmVm::create().unwrap();
        // SAFETY: `memory` lives until the end of the test, after the vCPUs are stopped (the
        // manager is dropped before it).
        unsafe { kvm_vm.register_memory(&memory).unwrap() };
        let cpuid = supported_cpuid(&kvm_vm.kvm).unwrap();
        let mut vcpus = VcpuManager::new(&kvm_vm.kvm, &kvm_vm.vm_fd, 1, &cpuid).unwrap();
        let copies = vcpus.lock_vcpu(0).copies_registers;
        crate::boot_cpu::program_boot_vcpu(&vcpus.lock_vcpu(0), &memory, &entry).unwrap();
        vcpus
            .start_paused(
                Arc::new(NoDevices),
                Arc::new(VmEvents::new().unwrap()),
                SeccompMode::Disabled,
            )
            .unwrap();
        assert!(
            vcpus.lock_vcpu_unchanged(0).copied_registers().is_none(),
            "a vCPU that never ran offered a copy"
        );
        vcpus.resume();
        std::thread::sleep(Duration::from_millis(20));
        vcpus.pause().unwrap();
        {
            let vcpu = vcpus.lock_vcpu_unchanged(0);
            let regs = vcpu.fd.get_regs().unwrap();
            let sregs = vcpu.fd.get_sregs().unwrap();
            assert!(regs.rax > 0, "the guest did not run");
            match vcpu.copied_registers() {
                Some((copied_regs, copied_sregs)) => {
                    assert_eq!(copied_regs, regs);
                    assert_eq!(copied_sregs, sregs);
                }
                None => assert!(!copies, "a parked vCPU that ran offered no copy"),
            }
        }
        // Changed by the control loop (as a restore does): the copy is stale.
        {
            let vcpu = vcpus.lock_vcpu(0);
            let mut regs = vcpu.fd.get_regs().unwrap();
            regs.rax = 0;
            vcpu.fd.set_regs(&regs).unwrap();
        }
        assert!(vcpus.lock_vcpu_unchanged(0).copied_registers().is_none());
        // It runs again: the copy is its state again, from the changed value on.
        vcpus.resume();
        std::thread::sleep(Duration::from_millis(20));
        vcpus.pause().unwrap();
        let vcpu = vcpus.lock_vcpu_unchanged(0);
        let regs = vcpu.fd.get_regs().unwrap();
        if let Some((copied_regs, _)) = vcpu.copied_registers() {
            assert_eq!(copied_regs, regs);
        }
        drop(vcpu);
        vcpus.stop();
    }

    /// The name and `Seccomp:` mode (0 none, 2 filter) of this process's thread `tid`.
    fn name_and_seccomp_mode(tid: libc::pid_t) -> Option<(String, u32)> {
        let task = std::path::PathBuf::from(format!("/proc/self/task/{tid}"));
        let name = std::fs::read_to_string(task.join("comm")).ok()?;
        let status = std::fs::read_to_string(task.join("status")).ok()?;
        let mode = status
            .lines()
            .find_map(|line| line.strip_prefix("Seccomp:"))
            .and_then(|mode| mode.trim().parse().ok())?;
        Some((name.trim_end().to_string(), mode))
    }

    #[test]
    fn threads_started_ahead_are_under_their_filter_before_they_get_a_vcpu() {
        let events = Arc::new(VmEvents::new().unwrap());
        let threads = VcpuThreads::spawn(2, events, SeccompMode::Log).unwrap();
        let mut ready = threads.wait_until_ready();
        ready.sort_unstable();
        let seen: Vec<_> = ready
            .iter()
            .filter_map(|&tid| name_and_seccomp_mode(tid))
            .collect();
        let mut names: Vec<_> = seen.iter().map(|(name, _)| name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["vcpu0", "vcpu1"]);
        assert!(seen.iter().all(|(_, mode)| *mode == 2), "{seen:?}");
        // Never handed a vCPU: dropping them ends and joins the threads (no hang).
        drop(threads);
        assert!(
            ready
                .iter()
                .all(|&tid| name_and_seccomp_mode(tid).is_none()),
            "the threads are gone"
        );
    }

    #[test]
    fn threads_started_ahead_take_their_vcpus_and_run_nothing_before_resume() {
        let kvm = Kvm::new().unwrap();
        let vm_fd = kvm.create_vm().unwrap();
        let events = Arc::new(VmEvents::new().unwrap());
        let threads = VcpuThreads::spawn(2, Arc::clone(&events), SeccompMode::Disabled).unwrap();
        let mut vcpus = VcpuManager::new(&kvm, &vm_fd, 2, &supported_cpuid(&kvm).unwrap()).unwrap();
        vcpus.start_on(threads, Arc::new(NoDevices)).unwrap();
        // `pause` returns once both threads hold their vCPU and are parked.
        vcpus.pause().unwrap();
        // A vCPU of this VM (no memory, no registers set) would fail its first KVM_RUN: none
        // ran, so none failed.
        assert!(events.take_failures().is_empty());
        vcpus.stop();
        assert!(events.take_failures().is_empty());
    }

    #[test]
    fn threads_started_for_another_vcpu_count_are_refused() {
        let kvm = Kvm::new().unwrap();
        let vm_fd = kvm.create_vm().unwrap();
        let events = Arc::new(VmEvents::new().unwrap());
        let threads = VcpuThreads::spawn(2, events, SeccompMode::Disabled).unwrap();
        let mut vcpus = VcpuManager::new(&kvm, &vm_fd, 1, &supported_cpuid(&kvm).unwrap()).unwrap();
        let refused = vcpus.start_on(threads, Arc::new(NoDevices)).unwrap_err();
        assert!(refused.to_string().contains("2 vCPU threads"), "{refused}");
    }

    #[test]
    fn apic_id_lands_in_the_leaves_the_guest_reads() {
        let entry = |function: u32, ebx: u32, edx: u32| kvm_cpuid_entry2 {
            function,
            ebx,
            edx,
            ..Default::default()
        };
        let mut cpuid = CpuId::from_entries(&[
            entry(1, 0xffff_1234, 0),
            entry(0xb, 0, 0x77),
            entry(0x1f, 0, 0x77),
            entry(7, 0xabcd, 0x55),
        ])
        .unwrap();
        set_apic_id(&mut cpuid, 3, 4);
        let entries = cpuid.as_slice();
        assert_eq!(
            entries[0].ebx, 0x0304_1234,
            "APIC ID, CPU count, low bits kept"
        );
        assert_eq!(entries[1].edx, 3);
        assert_eq!(entries[2].edx, 3);
        assert_eq!(
            (entries[3].ebx, entries[3].edx),
            (0xabcd, 0x55),
            "other leaves untouched"
        );
    }

    /// A pause that timed out (a vCPU thread the host did not schedule in time) fails, and the
    /// VM is still reported running: so the pause is withdrawn, and a thread that reaches its
    /// park point late runs on. Before, the request stayed: that thread parked for good, the
    /// guest stood still while `vm.info` said "Running", and `vm.resume` was refused.
    #[test]
    fn a_pause_that_timed_out_does_not_park_a_late_vcpu() {
        let control = Arc::new(RunControl::new(Request::Run));
        // One vCPU thread, kept from its park point (as a starved one is) until released.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (done, reached) = std::sync::mpsc::channel();
        let thread_control = Arc::clone(&control);
        let late = std::thread::spawn(move || {
            let _ = held.recv();
            let _ = done.send(thread_control.wait_while_paused());
        });
        let mut kicked = false;
        let paused = control.pause(1, Duration::from_millis(20), || kicked = true);
        assert_eq!(paused, Err(0), "the pause did not time out");
        assert!(kicked, "the threads were not kicked");
        release.send(()).unwrap();
        // Generous: a thread that runs on answers at once; one parked never does.
        let next = reached.recv_timeout(Duration::from_secs(30));
        control.lock().request = Request::Stop;
        control.changed.notify_all();
        late.join().unwrap();
        assert_eq!(
            next,
            Ok(Request::Run),
            "the late vCPU thread parked after its pause had failed"
        );
    }

    /// The withdrawal does not cost a pause that succeeds: every thread parks and stays parked
    /// until the resume.
    #[test]
    fn a_pause_parks_every_vcpu_until_the_resume() {
        let control = Arc::new(RunControl::new(Request::Run));
        let (done, resumed) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        // The "kick" starts two threads that go to their park point, as kicked vCPUs do.
        let kick = || {
            for _ in 0..2 {
                let control = Arc::clone(&control);
                let done = done.clone();
                threads.push(std::thread::spawn(move || {
                    let _ = done.send(control.wait_while_paused());
                }));
            }
        };
        assert_eq!(control.pause(2, Duration::from_secs(30), kick), Ok(()));
        assert_eq!(control.lock().request, Request::Pause);
        assert!(resumed.try_recv().is_err(), "a parked thread ran on");
        control.lock().request = Request::Run;
        control.changed.notify_all();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(
            resumed.iter().take(2).collect::<Vec<_>>(),
            [Request::Run; 2]
        );
    }
}

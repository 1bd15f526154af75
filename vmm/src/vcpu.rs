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

use kvm_bindings::{kvm_run, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::config::SeccompMode;
use crate::events::VmEvents;
use crate::seccomp_filters::{apply_filter_for_mode, ThreadKind};
use crate::Error;

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
        let fd = vm_fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_error("KVM_CREATE_VCPU"))?;
        let mut cpuid = supported.clone();
        set_apic_id(&mut cpuid, id, vcpu_count);
        fd.set_cpuid2(&cpuid).map_err(kvm_error("KVM_SET_CPUID2"))?;
        Ok(Vcpu { id, fd })
    }

    /// One KVM_RUN and the handling of its exit: port I/O and MMIO are served in place, on this
    /// thread; everything else stops or interrupts the run.
    fn run_once(&mut self, io: &dyn IoHandler) -> RunOutcome {
        match self.fd.run() {
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
    /// The kernel thread ids of the vCPU threads past their seccomp filter's installation (done
    /// or failed), i.e. ready for their vCPU.
    ready: Vec<libc::pid_t>,
}

/// What the control loop asks of the vCPU threads, and how many of them have complied.
#[derive(Debug)]
struct RunControl {
    state: Mutex<RunState>,
    changed: Condvar,
}

impl RunControl {
    fn new() -> RunControl {
        RunControl {
            state: Mutex::new(RunState {
                request: Request::Pause,
                parked: 0,
                ready: Vec::new(),
            }),
            changed: Condvar::new(),
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
            self.changed.notify_all();
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

    /// The vCPU thread `tid` is past its seccomp filter and can take its vCPU.
    fn note_ready(&self, tid: libc::pid_t) {
        self.lock().ready.push(tid);
        self.changed.notify_all();
    }

    /// A vCPU that cannot run any more waits here, counted as parked, until the VM is torn down.
    fn park_until_stop(&self) {
        let mut state = self.lock();
        state.parked += 1;
        self.changed.notify_all();
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
            control: Arc::new(RunControl::new()),
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

    /// Locks vCPU `index` for reading or writing its state. Only meaningful while paused.
    pub fn lock_vcpu(&self, index: usize) -> MutexGuard<'_, Vcpu> {
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
        self.wait_for_parked(self.threads.len())
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
        Ok(())
    }

    /// Kicks every vCPU out of KVM_RUN and waits until all are parked.
    pub fn pause(&self) -> Result<(), Error> {
        self.control.lock().request = Request::Pause;
        self.kick_all();
        if self
            .power_fail_priority
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            // After the kick, never before: see `power_fail_priority`.
            crate::power_fail_priority::set_vcpu_threads(&self.threads, true);
        }
        self.wait_for_parked(self.threads.len())
    }

    /// Tells a kvmclock guest that its vCPUs were stopped by the host (KVM_KVMCLOCK_CTRL), so
    /// its watchdogs do not mistake the pause for a soft lockup. Guests that have not set up
    /// kvmclock (EINVAL) need no notice.
    pub fn notify_guest_clock_paused(&self) {
        for index in 0..self.vcpus.len() {
            let vcpu = self.lock_vcpu(index);
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

    fn wait_for_parked(&self, expected: usize) -> Result<(), Error> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut state = self.control.lock();
        while state.parked < expected {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::PauseTimeout {
                    parked: state.parked,
                    total: expected,
                    timeout_ms: PAUSE_TIMEOUT.as_millis() as u64,
                });
            }
            state = self
                .control
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        Ok(())
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
            control: Arc::new(RunControl::new()),
            handovers: Vec::with_capacity(usize::from(count)),
            threads: Vec::with_capacity(usize::from(count)),
        };
        for id in 0..count {
            let (handover, handed_over) = channel();
            let control = Arc::clone(&threads.control);
            let events = Arc::clone(&events);
            // On an error, `threads` is dropped: the ones started so far end.
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu_thread(id, handed_over, control, events, seccomp))
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
        let mut state = self.control.lock();
        while state.ready.len() < self.threads.len() {
            state = self
                .control
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        state.ready.clone()
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
) {
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    // Before the thread has its vCPU, so guest-triggered exits are only ever served under the
    // filter.
    let filtered = apply_filter_for_mode(ThreadKind::Vcpu, seccomp);
    control.note_ready(tid);
    let Ok(Handover { vcpu, io }) = handed_over.recv() else {
        // The VM was not built: there is nothing to run.
        return;
    };
    drop(handed_over);
    if let Err(e) = filtered {
        events.signal_vcpu_failure(id, format!("installing the seccomp filter: {e}"));
        control.park_until_stop();
        return;
    }
    {
        let mut guard = vcpu.lock().unwrap_or_else(|p| p.into_inner());
        let run: *mut kvm_run = guard.fd.get_kvm_run();
        KVM_RUN_OF_THIS_THREAD.with(|cell| cell.set(run));
    }

    let mut next = control.wait_while_paused();
    while next == Request::Run {
        let outcome = vcpu
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .run_once(io.as_ref());
        match outcome {
            RunOutcome::Continue => {}
            RunOutcome::Interrupted => next = control.wait_while_paused(),
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
                control.park_until_stop();
                break;
            }
        }
    }
    KVM_RUN_OF_THIS_THREAD.with(|cell| cell.set(std::ptr::null_mut()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    struct NoDevices;

    impl IoHandler for NoDevices {
        fn pio_read(&self, _port: u16, _data: &mut [u8]) {}
        fn pio_write(&self, _port: u16, _data: &[u8]) {}
        fn mmio_read(&self, _address: u64, _data: &mut [u8]) {}
        fn mmio_write(&self, _address: u64, _data: &[u8]) {}
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
}

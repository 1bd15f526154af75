//! What a test prints about a VMM that stopped making progress, before it kills it: enough to
//! tell a guest spinning somewhere (vCPU threads running, registers) from a VMM thread blocked
//! in the kernel (its state, wait channel and kernel stack) without reproducing the hang.
//!
//! Everything here is best effort: a part that cannot be read says why and the report goes on.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use ::api_client::Connection;

/// How long each API call of the report may take.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// The gap between the two samples of the threads' CPU times.
const SAMPLE_GAP: Duration = Duration::from_millis(500);

/// One line per thread of `pid` (name, state, CPU ticks used and how many of them in the last
/// `SAMPLE_GAP`, the host CPU it last ran on, wait channel) and its kernel stack where readable
/// (root only): a vCPU thread in `R` whose ticks grow runs guest code; one in `S` or `D` sits
/// where its stack says.
pub fn threads(pid: i32) -> String {
    let first = thread_samples(pid);
    std::thread::sleep(SAMPLE_GAP);
    let second = thread_samples(pid);
    if second.is_empty() {
        return format!("threads of {pid}: none readable (the process has ended?)\n");
    }
    let mut report = format!(
        "threads of {pid} (ticks: user+system CPU time, and in the last {} ms):\n",
        SAMPLE_GAP.as_millis()
    );
    for thread in &second {
        let before = first
            .iter()
            .find(|earlier| earlier.tid == thread.tid)
            .map_or(thread.ticks, |earlier| earlier.ticks);
        let _ = writeln!(
            report,
            "  {} ({}): state {} ticks {} (+{}) cpu {} wchan {}",
            thread.name,
            thread.tid,
            thread.state,
            thread.ticks,
            thread.ticks.saturating_sub(before),
            thread.cpu,
            thread.wchan
        );
        let task = format!("/proc/{pid}/task/{}", thread.tid);
        if let Ok(stack) = std::fs::read_to_string(format!("{task}/stack")) {
            for frame in stack.lines() {
                let _ = writeln!(report, "      {frame}");
            }
        }
    }
    report
}

struct ThreadSample {
    tid: String,
    name: String,
    state: String,
    ticks: u64,
    cpu: String,
    wchan: String,
}

fn thread_samples(pid: i32) -> Vec<ThreadSample> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut samples: Vec<ThreadSample> = tasks
        .flatten()
        .filter_map(|task| {
            let path = task.path();
            let stat = std::fs::read_to_string(path.join("stat")).ok()?;
            // The name is in parentheses and may hold spaces: the fields follow the last ')'.
            let (head, fields) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1.to_owned();
            let fields: Vec<&str> = fields.split_whitespace().collect();
            // After the name: state is field 3 of stat(5), utime 14, stime 15, processor 39.
            let number = |index: usize| fields.get(index - 3)?.parse::<u64>().ok();
            Some(ThreadSample {
                tid: task.file_name().to_string_lossy().into_owned(),
                name,
                state: fields.first()?.to_string(),
                ticks: number(14)? + number(15)?,
                cpu: fields.get(39 - 3).map_or("?", |cpu| cpu).to_owned(),
                wchan: std::fs::read_to_string(path.join("wchan")).unwrap_or_else(|_| "?".into()),
            })
        })
        .collect();
    samples.sort_by(|a, b| a.name.cmp(&b.name).then(a.tid.cmp(&b.tid)));
    samples
}

/// The VM as its API sees it: `vm.counters`, then whether a pause gets every vCPU out of
/// KVM_RUN (a vCPU stuck in the kernel makes it fail with the parked count), and if it does,
/// each vCPU's instruction pointer, flags and stack pointer from a snapshot written into
/// `scratch`. The VM is left paused.
pub fn vm(socket: &Path, scratch: &Path) -> String {
    let mut report = format!("the VM through {}:\n", socket.display());
    let counters = call(socket, "GET", "vm.counters", "");
    let _ = writeln!(report, "  vm.counters: {counters}");
    let pause = call(socket, "PUT", "vm.pause", "");
    let _ = writeln!(report, "  vm.pause: {pause}");
    if !pause.starts_with("20") {
        return report;
    }
    let snapshot = scratch.join("hang-snapshot");
    if let Err(error) = std::fs::create_dir_all(&snapshot) {
        let _ = writeln!(report, "  no snapshot: {}: {error}", snapshot.display());
        return report;
    }
    let body = serde_json::json!({ "destination_url": format!("file://{}", snapshot.display()) });
    let saved = call(socket, "PUT", "vm.snapshot", &body.to_string());
    let _ = writeln!(report, "  vm.snapshot: {saved}");
    match std::fs::read_to_string(snapshot.join("state.json")) {
        Ok(state) => report.push_str(&vcpu_registers(&state)),
        Err(error) => {
            let _ = writeln!(report, "  state.json: {error}");
        }
    }
    report
}

/// `status body` of one call, or what went wrong; never panics.
fn call(socket: &Path, method: &str, endpoint: &str, body: &str) -> String {
    let request = crate::api_client::request_bytes(method, endpoint, body);
    let mut connection = match Connection::open(socket, API_TIMEOUT) {
        Ok(connection) => connection,
        Err(error) => return format!("cannot connect: {error}"),
    };
    if let Err(error) = connection.send(&request) {
        return format!("cannot send: {error}");
    }
    match connection.read_answer() {
        Ok(Some(answer)) => format!("{} {}", answer.status, answer.body.trim()),
        Ok(None) => "no answer".to_owned(),
        Err(error) => format!("no readable answer: {error}"),
    }
}

/// Byte offsets in `struct kvm_regs` (the KVM ABI: 16 general registers, then rip, rflags).
const REGS_RSP: usize = 6 * 8;
const REGS_RIP: usize = 16 * 8;
const REGS_RFLAGS: usize = 17 * 8;

/// `vCPU i: rip .. rflags .. rsp .. mp_state ..` for each vCPU of a snapshot's `state.json`
/// (a test guest's rip maps to its source with `addr2line -e target/guests/<guest>`).
pub fn vcpu_registers(state_json: &str) -> String {
    let state: serde_json::Value = match serde_json::from_str(state_json) {
        Ok(state) => state,
        Err(error) => return format!("  state.json is not JSON: {error}\n"),
    };
    let Some(vcpus) = state["content"]["vm"]["vcpus"].as_array() else {
        return "  state.json has no content.vm.vcpus\n".to_owned();
    };
    let mut report = String::new();
    for vcpu in vcpus {
        let regs: Vec<u8> = vcpu["regs"]
            .as_array()
            .map(|bytes| {
                bytes
                    .iter()
                    .filter_map(|byte| u8::try_from(byte.as_u64()?).ok())
                    .collect()
            })
            .unwrap_or_default();
        let word = |offset: usize| {
            regs.get(offset..offset + 8)
                .and_then(|bytes| bytes.try_into().ok())
                .map_or_else(
                    || "?".to_owned(),
                    |bytes| format!("{:#x}", u64::from_le_bytes(bytes)),
                )
        };
        let _ = writeln!(
            report,
            "  vCPU {}: rip {} rflags {} rsp {} mp_state {}",
            vcpu["id"],
            word(REGS_RIP),
            word(REGS_RFLAGS),
            word(REGS_RSP),
            mp_state_name(&vcpu["mp_state"])
        );
    }
    report
}

/// A saved `kvm_mp_state` (its 4 bytes, little-endian) by its KVM name.
fn mp_state_name(saved: &serde_json::Value) -> String {
    let bytes: Option<Vec<u8>> = saved.as_array().and_then(|bytes| {
        bytes
            .iter()
            .map(|byte| u8::try_from(byte.as_u64()?).ok())
            .collect()
    });
    match bytes.and_then(|bytes| <[u8; 4]>::try_from(bytes).ok()) {
        Some(bytes) => match u32::from_le_bytes(bytes) {
            0 => "RUNNABLE".to_owned(),
            1 => "UNINITIALIZED".to_owned(),
            2 => "INIT_RECEIVED".to_owned(),
            3 => "HALTED".to_owned(),
            4 => "SIPI_RECEIVED".to_owned(),
            other => other.to_string(),
        },
        None => saved.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registers_are_read_from_the_byte_array_of_kvm_regs() {
        let mut regs = vec![0u8; 18 * 8];
        regs[REGS_RIP..REGS_RIP + 8].copy_from_slice(&0x40_1234u64.to_le_bytes());
        regs[REGS_RFLAGS..REGS_RFLAGS + 8].copy_from_slice(&0x202u64.to_le_bytes());
        regs[REGS_RSP..REGS_RSP + 8].copy_from_slice(&0x7ff0u64.to_le_bytes());
        let state = serde_json::json!({"content": {"vm": {"vcpus": [
            {"id": 0, "regs": regs, "mp_state": [0, 0, 0, 0]},
            {"id": 1, "regs": "not bytes", "mp_state": [1, 0, 0, 0]},
        ]}}});
        let report = vcpu_registers(&state.to_string());
        assert!(
            report.contains("vCPU 0: rip 0x401234 rflags 0x202 rsp 0x7ff0 mp_state RUNNABLE"),
            "{report}"
        );
        assert!(
            report.contains("vCPU 1: rip ? rflags ? rsp ? mp_state UNINITIALIZED"),
            "{report}"
        );
    }

    #[test]
    fn this_process_reports_its_own_threads_with_a_state() {
        let report = threads(std::process::id() as i32);
        assert!(report.contains("state R"), "{report}");
    }
}

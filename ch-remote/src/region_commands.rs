//! The `nv-persist` verbs that work on an NV region directly, without a VMM's API socket:
//! `list --region R` (a read-only open of the region) and `power-fail --region R`, the one command
//! a UPS daemon's hook runs when the host goes on battery: every live VMM of the region gets
//! SIGPWR (each saves its VM in place and exits 75), and the command waits until each VM's record
//! shows a committed save newer than the one it had, or its VMM exited without one, or the
//! timeout passed. `docs/recovery.md` ("One UPS event for a whole region") shows a hook.
//!
//! Which VMMs are live comes from the owner records in the region (boot id, pid, start time),
//! checked by nv-extension; each is signalled through a pidfd opened before that check, so a
//! reused pid is never signalled (`nv_extension::owner_process`).

use std::time::{Duration, Instant};

use nv_extension::{wait_for_any_exit, OpenOptions, OwnerProcess, Region, RunRecord, VmSummary};

/// What a region verb does.
#[derive(Debug, PartialEq, Eq)]
pub enum RegionAction {
    /// Print the region's listing (the body of `vmm.nv-regions`).
    List { region: String },
    /// Power-fail every live VM of the region and wait for their saves.
    PowerFail { region: String, timeout: Duration },
}

#[derive(Debug, thiserror::Error)]
pub enum RegionCommandError {
    #[error("NV region {region}")]
    Region {
        region: String,
        #[source]
        source: nv_extension::Error,
    },
    #[error("listing NV region {region}")]
    Listing {
        region: String,
        #[source]
        source: Box<vmm::Error>,
    },
    #[error("waiting for the VMMs of NV region {region}")]
    Wait {
        region: String,
        #[source]
        source: std::io::Error,
    },
    /// The command ran and printed its lines; some VM did not commit a save.
    #[error("{failed} of {total} VMs of NV region {region} were not saved")]
    NotAllSaved {
        region: String,
        failed: usize,
        total: usize,
    },
}

/// Runs `action`, printing its result on stdout.
pub fn run(action: &RegionAction) -> Result<(), RegionCommandError> {
    match action {
        RegionAction::List { region } => {
            let listing =
                vmm::nv::region_listing(region).map_err(|source| RegionCommandError::Listing {
                    region: region.clone(),
                    source: Box::new(source),
                })?;
            // The same compact JSON the VMM answers `vmm.nv-regions` with.
            println!("{}", serde_json::json!(listing));
            Ok(())
        }
        RegionAction::PowerFail { region, timeout } => {
            let outcomes = power_fail_region(region, *timeout)?;
            let report = render(&outcomes);
            print!("{report}");
            let failed = outcomes
                .iter()
                .filter(|(_, outcome)| matches!(outcome, Outcome::Failed(_)))
                .count();
            if failed > 0 {
                return Err(RegionCommandError::NotAllSaved {
                    region: region.clone(),
                    failed,
                    total: outcomes.len(),
                });
            }
            Ok(())
        }
    }
}

/// How one VM of the region came through `power-fail --region`.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Its VMM committed a save with this sequence; `took` from the save report, when recorded.
    Committed { seq: u64, took: Option<Duration> },
    /// No live VMM owned it and nothing of it was at risk (suspended, saved, created, off).
    NotRunning { state: &'static str },
    /// It is not saved: why.
    Failed(String),
}

/// A VM whose VMM was signalled, until its save is seen. `P` holds the VMM's process (a
/// pidfd); the tests use `()`.
struct Pending<P> {
    /// Index of the VM in the report.
    slot: usize,
    name: String,
    pid: u32,
    seq_before: u64,
    process: P,
}

/// What the region's records say of a pending VM in one round.
enum Record {
    /// A committed save newer than the one it had when signalled.
    Committed(Outcome),
    NoNewSave,
    /// No VM of that name any more.
    Gone,
}

/// One round of the wait, after `exited` (one flag per pending VM, in order) was taken and then
/// the records read (`record`): settles the VMs that committed, whose VMM was seen exited
/// without a new save, or, once `timed_out`, all the rest. Returns the settled (slot, outcome)
/// pairs and the VMs still waiting, in their order. Each VM is judged by its own exit flag.
fn settle<P>(
    pending: Vec<Pending<P>>,
    exited: &[bool],
    record: impl Fn(&Pending<P>) -> Record,
    timed_out: bool,
    timeout: Duration,
) -> (Vec<(usize, Outcome)>, Vec<Pending<P>>) {
    let mut settled = Vec::new();
    let mut waiting = Vec::new();
    for (vm, &exited) in pending.into_iter().zip(exited) {
        let pid = vm.pid;
        let outcome = match record(&vm) {
            // Committed, but its report (the save time) is written just after the commit, in a
            // transaction of its own: wait for it until the VMM exits (right after writing it).
            Record::Committed(Outcome::Committed { took: None, .. }) if !exited && !timed_out => {
                waiting.push(vm);
                continue;
            }
            Record::Committed(done) => done,
            Record::Gone => Outcome::Failed("deleted from the region meanwhile".into()),
            Record::NoNewSave if exited => {
                Outcome::Failed(format!("VMM pid {pid} exited without a committed save"))
            }
            Record::NoNewSave if timed_out => Outcome::Failed(format!(
                "VMM pid {pid}: no committed save within {} ms",
                timeout.as_millis()
            )),
            Record::NoNewSave => {
                waiting.push(vm);
                continue;
            }
        };
        settled.push((vm.slot, outcome));
    }
    (settled, waiting)
}

fn region_error(region: &str) -> impl Fn(nv_extension::Error) -> RegionCommandError + '_ {
    move |source| RegionCommandError::Region {
        region: region.to_string(),
        source,
    }
}

/// A committed save newer than `seq_before` in the VM's record.
fn committed(summary: &VmSummary, seq_before: u64) -> Option<Outcome> {
    match summary.state {
        RunRecord::Saved { seq, .. } if seq > seq_before => Some(Outcome::Committed {
            seq,
            took: summary
                .last_save
                .as_ref()
                .filter(|report| report.seq == seq)
                .map(|report| report.total),
        }),
        _ => None,
    }
}

/// How often the records are read again while no VMM exits (a VMM that saved exits at once, and
/// an exit wakes the wait earlier).
const POLL: Duration = Duration::from_millis(20);

fn power_fail_region(
    path: &str,
    timeout: Duration,
) -> Result<Vec<(String, Outcome)>, RegionCommandError> {
    let to_error = region_error(path);
    let read_only = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let region = Region::open(path, &read_only).map_err(&to_error)?;
    let mut outcomes: Vec<(String, Option<Outcome>)> = Vec::new();
    let mut pending: Vec<Pending<OwnerProcess>> = Vec::new();
    for summary in region.list_vms().map_err(&to_error)? {
        let index = outcomes.len();
        let outcome = match region.owner_process(&summary.name).map_err(&to_error)? {
            Some(process) => match process.signal(libc::SIGPWR) {
                Err(error) if error.raw_os_error() != Some(libc::ESRCH) => Some(Outcome::Failed(
                    format!("signalling VMM pid {}: {error}", process.pid()),
                )),
                // Signalled, or exited in between (ESRCH): its record tells which below.
                _ => {
                    pending.push(Pending {
                        slot: index,
                        name: summary.name.clone(),
                        pid: process.pid(),
                        seq_before: summary.last_save_seq.unwrap_or(0),
                        process,
                    });
                    None
                }
            },
            None if matches!(summary.state, RunRecord::Running { .. }) => Some(Outcome::Failed(
                "unsafe: its VMM died without a save before this power failure (cold boot only)"
                    .to_string(),
            )),
            None => Some(Outcome::NotRunning {
                state: summary.status(),
            }),
        };
        outcomes.push((summary.name.clone(), outcome));
    }

    let deadline = Instant::now() + timeout;
    while !pending.is_empty() {
        // Exits first, then the records: a VMM commits before it exits, so a VMM seen exited
        // whose record shows no new save exited without one.
        let exited: Vec<bool> = pending.iter().map(|vm| vm.process.has_exited()).collect();
        let summaries = region.list_vms().map_err(&to_error)?;
        let record = |vm: &Pending<OwnerProcess>| match summaries
            .iter()
            .find(|summary| summary.name == vm.name)
        {
            None => Record::Gone,
            Some(summary) => {
                committed(summary, vm.seq_before).map_or(Record::NoNewSave, Record::Committed)
            }
        };
        let timed_out = Instant::now() >= deadline;
        let (settled, waiting) = settle(pending, &exited, record, timed_out, timeout);
        for (slot, outcome) in settled {
            outcomes[slot].1 = Some(outcome);
        }
        pending = waiting;
        if pending.is_empty() {
            break;
        }
        let processes: Vec<&OwnerProcess> = pending.iter().map(|vm| &vm.process).collect();
        let wait = deadline.saturating_duration_since(Instant::now()).min(POLL);
        wait_for_any_exit(&processes, wait).map_err(|source| RegionCommandError::Wait {
            region: path.to_string(),
            source,
        })?;
    }
    Ok(outcomes
        .into_iter()
        .map(|(name, outcome)| {
            let outcome = outcome.unwrap_or_else(|| Outcome::Failed("not waited for".into()));
            (name, outcome)
        })
        .collect())
}

fn milliseconds(took: Duration) -> String {
    format!("{:.3} ms", took.as_secs_f64() * 1e3)
}

/// One line per VM and a total line.
pub fn render(outcomes: &[(String, Outcome)]) -> String {
    let mut text = String::new();
    let mut times = Vec::new();
    let (mut committed, mut failed, mut idle) = (0, 0, 0);
    for (name, outcome) in outcomes {
        let line = match outcome {
            Outcome::Committed { seq, took } => {
                committed += 1;
                let took = match took {
                    Some(took) => {
                        times.push(*took);
                        format!("save {}", milliseconds(*took))
                    }
                    None => "save time not recorded".to_string(),
                };
                format!("{name}: committed seq {seq}, {took}")
            }
            Outcome::NotRunning { state } => {
                idle += 1;
                format!("{name}: not running ({state}), nothing to save")
            }
            Outcome::Failed(why) => {
                failed += 1;
                format!("{name}: error: {why}")
            }
        };
        text.push_str(&line);
        text.push('\n');
    }
    times.sort();
    let mut total = format!(
        "total: {committed} committed, {failed} failed, {idle} not running, of {} VMs",
        outcomes.len()
    );
    if let (Some(slowest), Some(median)) = (times.last(), times.get(times.len() / 2)) {
        total.push_str(&format!(
            "; slowest save {}, median save {}",
            milliseconds(*slowest),
            milliseconds(*median)
        ));
    }
    text.push_str(&total);
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(slot: usize, name: &str) -> Pending<()> {
        Pending {
            slot,
            name: name.into(),
            pid: 100 + slot as u32,
            seq_before: 1,
            process: (),
        }
    }

    /// Each VM is judged by its own exit: a committed VM settled before another must not shift
    /// the flags (a VM still saving was once reported as "exited" for its neighbour's exit).
    #[test]
    fn each_vm_is_settled_by_its_own_record_and_exit() {
        let pending = vec![
            waiting(0, "saved"),
            waiting(1, "saving"),
            waiting(2, "died"),
            waiting(3, "deleted"),
            waiting(4, "slow"),
        ];
        let exited = [true, false, true, false, false];
        let record = |vm: &Pending<()>| match vm.name.as_str() {
            "saved" => Record::Committed(Outcome::Committed { seq: 2, took: None }),
            "deleted" => Record::Gone,
            _ => Record::NoNewSave,
        };
        let timeout = Duration::from_millis(500);
        let (settled, still) = settle(pending, &exited, record, false, timeout);
        assert_eq!(
            settled,
            vec![
                (0, Outcome::Committed { seq: 2, took: None }),
                (
                    2,
                    Outcome::Failed("VMM pid 102 exited without a committed save".into())
                ),
                (
                    3,
                    Outcome::Failed("deleted from the region meanwhile".into())
                ),
            ]
        );
        let names: Vec<&str> = still.iter().map(|vm| vm.name.as_str()).collect();
        assert_eq!(names, ["saving", "slow"]);

        // Committed but its save report not written yet, the VMM still running: it waits for
        // the report (the 16-VM test once read such a VM between its commit and its report).
        let record = |vm: &Pending<()>| match vm.name.as_str() {
            "saving" => Record::Committed(Outcome::Committed { seq: 2, took: None }),
            _ => Record::NoNewSave,
        };
        let (settled, still) = settle(still, &[false, false], record, false, timeout);
        assert!(settled.is_empty(), "{settled:?}");
        let names: Vec<&str> = still.iter().map(|vm| vm.name.as_str()).collect();
        assert_eq!(names, ["saving", "slow"]);

        // At the deadline the rest fail; a save seen in that same round still counts.
        let record = |vm: &Pending<()>| match vm.name.as_str() {
            "saving" => Record::Committed(Outcome::Committed { seq: 2, took: None }),
            _ => Record::NoNewSave,
        };
        let (settled, still) = settle(still, &[false, false], record, true, timeout);
        assert!(still.is_empty());
        assert_eq!(
            settled,
            vec![
                (1, Outcome::Committed { seq: 2, took: None }),
                (
                    4,
                    Outcome::Failed("VMM pid 104: no committed save within 500 ms".into())
                ),
            ]
        );
    }

    #[test]
    fn one_line_per_vm_and_a_total() {
        let outcomes = vec![
            (
                "a".to_string(),
                Outcome::Committed {
                    seq: 3,
                    took: Some(Duration::from_micros(1500)),
                },
            ),
            (
                "b".to_string(),
                Outcome::Committed {
                    seq: 7,
                    took: Some(Duration::from_micros(900)),
                },
            ),
            ("c".to_string(), Outcome::Committed { seq: 1, took: None }),
            ("d".to_string(), Outcome::NotRunning { state: "suspended" }),
            (
                "e".to_string(),
                Outcome::Failed("VMM pid 42 exited without a committed save".into()),
            ),
        ];
        assert_eq!(
            render(&outcomes),
            "a: committed seq 3, save 1.500 ms\n\
             b: committed seq 7, save 0.900 ms\n\
             c: committed seq 1, save time not recorded\n\
             d: not running (suspended), nothing to save\n\
             e: error: VMM pid 42 exited without a committed save\n\
             total: 3 committed, 1 failed, 1 not running, of 5 VMs; slowest save 1.500 ms, \
             median save 1.500 ms\n"
        );
        assert_eq!(
            render(&[]),
            "total: 0 committed, 0 failed, 0 not running, of 0 VMs\n"
        );
    }
}

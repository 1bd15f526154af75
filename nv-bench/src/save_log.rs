//! Reads the VMM's one-line record of a committed power-fail save:
//! `VM "a": power-fail save committed seq 3 (N state bytes) in 812 us (deadline 50 ms): pause-vcpus 120 us, ...`
//! (written at warn level by `vmm::nv::describe_save`, so it is in the VMM's default output).

/// The total and per-phase times of one committed save, in microseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct SaveTimings {
    pub total_us: u64,
    pub phases: Vec<(String, u64)>,
    pub deadline_overrun: bool,
}

/// Finds the last committed-save line in `output` and parses it.
pub fn parse_last_save(output: &str) -> Option<SaveTimings> {
    output
        .lines()
        .rev()
        .find(|line| line.contains("save committed seq"))
        .and_then(parse_save_line)
}

fn parse_save_line(line: &str) -> Option<SaveTimings> {
    let after_in = &line[line.find(" in ")? + 4..];
    let total_us = after_in.split_whitespace().next()?.parse().ok()?;
    let deadline_at = after_in.find("(deadline")?;
    let after_deadline = &after_in[deadline_at..];
    let deadline_overrun = after_deadline
        .split("):")
        .next()
        .is_some_and(|inside| inside.contains("OVERRUN"));
    let list = &after_deadline[after_deadline.find("):")? + 2..];
    let phases = list
        .split(',')
        .map(|item| {
            let words: Vec<&str> = item.split_whitespace().collect();
            match words.as_slice() {
                [name, micros, "us"] => Some((name.to_string(), micros.parse().ok()?)),
                _ => None,
            }
        })
        .collect::<Option<Vec<_>>>()?;
    Some(SaveTimings {
        total_us,
        phases,
        deadline_overrun,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_committed_save_line_with_a_log_prefix() {
        let output = "cloud-hypervisor: 1.2s WARN VM \"kv\": power-fail save committed seq 3 (4096 state bytes) \
             in 812 us (deadline 50 ms): pause-vcpus 120 us, quiesce-devices 5 us, \
             persist-memory 300 us, save-state 200 us, commit 187 us\n";
        let timings = parse_last_save(output).unwrap();
        assert_eq!(timings.total_us, 812);
        assert!(!timings.deadline_overrun);
        assert_eq!(timings.phases.len(), 5);
        assert_eq!(timings.phases[2], ("persist-memory".to_string(), 300));
    }

    #[test]
    fn notes_an_overrun_and_ignores_other_lines() {
        let output =
            "noise\nVM \"kv\": power-fail save committed seq 1 (9 state bytes) in 90000 us \
             (deadline 50 ms, OVERRUN): persist-memory 89000 us\nlater noise\n";
        let timings = parse_last_save(output).unwrap();
        assert!(timings.deadline_overrun);
        assert_eq!(timings.phases, [("persist-memory".to_string(), 89000)]);
        assert_eq!(parse_last_save("nothing here"), None);
    }
}

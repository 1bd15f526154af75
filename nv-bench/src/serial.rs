//! Host-side timestamps for guest serial output: a thread follows the serial file as the VMM
//! writes it and stamps each complete line with the host's monotonic clock when it was seen.
//!
//! The guest's TSC cannot be restored on this host (it jumps across a save/restore), so every
//! duration the benchmark reports comes from these host stamps, never from the guest's `tsc=`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the file is checked for new bytes: the resolution of every stamp.
pub const POLL_INTERVAL: Duration = Duration::from_millis(2);

/// One complete serial line and when the host first saw it.
#[derive(Clone, Debug)]
pub struct TimedLine {
    pub at: Instant,
    pub text: String,
}

/// Lines seen so far, shared with the following thread.
type SharedLines = Arc<Mutex<Vec<TimedLine>>>;

/// Follows one serial file from a given offset until dropped or stopped.
pub struct SerialFollower {
    path: PathBuf,
    lines: SharedLines,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SerialFollower {
    /// Follows `path` from its current end (or from the start if it does not exist yet), so
    /// only lines written from now on are seen. A VMM that truncates the file when it opens it
    /// is handled: a file shorter than the offset is read again from its start.
    pub fn from_current_end(path: &Path) -> Self {
        let offset = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let lines: SharedLines = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let path = path.to_path_buf();
            let lines = Arc::clone(&lines);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || follow(&path, offset, &lines, &stop))
        };
        Self {
            path: path.to_path_buf(),
            lines,
            stop,
            thread: Some(thread),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A copy of the lines seen so far.
    pub fn lines(&self) -> Vec<TimedLine> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The last `count` lines as text, for error reports.
    pub fn tail_text(&self, count: usize) -> String {
        let lines = self.lines();
        let start = lines.len().saturating_sub(count);
        lines[start..]
            .iter()
            .map(|line| line.text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops following after one last read and returns every line seen.
    pub fn finish(mut self) -> Vec<TimedLine> {
        self.stop_thread();
        self.lines()
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            // A panicking follower only loses stamps; the lines gathered so far stay usable.
            let _ = thread.join();
        }
    }
}

impl Drop for SerialFollower {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

fn follow(path: &Path, mut offset: u64, lines: &Mutex<Vec<TimedLine>>, stop: &AtomicBool) {
    let mut partial = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut file: Option<File> = None;
    loop {
        // Read the stop flag before reading, so the final pass sees everything written before
        // the caller asked to stop.
        let stopping = stop.load(Ordering::Acquire);
        if file.is_none() {
            file = File::open(path).ok();
        }
        if let Some(open) = file.as_mut() {
            let length = open.metadata().map(|m| m.len()).unwrap_or(offset);
            if length < offset {
                offset = 0;
                partial.clear();
            }
            if length > offset && open.seek(SeekFrom::Start(offset)).is_ok() {
                while let Ok(count) = open.read(&mut buffer) {
                    if count == 0 {
                        break;
                    }
                    offset += count as u64;
                    partial.extend_from_slice(&buffer[..count]);
                }
                let now = Instant::now();
                let mut fresh = Vec::new();
                while let Some(end) = partial.iter().position(|&byte| byte == b'\n') {
                    let line: Vec<u8> = partial.drain(..=end).collect();
                    let text = String::from_utf8_lossy(&line[..end])
                        .trim_end_matches('\r')
                        .to_string();
                    fresh.push(TimedLine { at: now, text });
                }
                if !fresh.is_empty() {
                    lines
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .extend(fresh);
                }
            }
        }
        if stopping {
            return;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn wait_until(follower: &SerialFollower, count: usize) -> Vec<TimedLine> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let lines = follower.lines();
            if lines.len() >= count || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn stamps_complete_lines_in_order_and_holds_back_a_partial_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial");
        let follower = SerialFollower::from_current_end(&path);
        let mut file = File::create(&path).unwrap();
        file.write_all(b"first\nsec").unwrap();
        let seen = wait_until(&follower, 1);
        assert_eq!(seen.len(), 1);
        std::thread::sleep(Duration::from_millis(20));
        file.write_all(b"ond\r\nthird").unwrap();
        let lines = follower.finish();
        let texts: Vec<_> = lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["first", "second"]);
        assert!(lines[1].at > lines[0].at);
    }

    #[test]
    fn starts_at_the_current_end_and_survives_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial");
        std::fs::write(&path, "old line from an earlier VMM\n").unwrap();
        let follower = SerialFollower::from_current_end(&path);
        std::thread::sleep(Duration::from_millis(20));
        // A new VMM truncates the file and writes its own lines.
        std::fs::write(&path, "new\n").unwrap();
        let lines = wait_until(&follower, 1);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0].text, "new");
    }
}

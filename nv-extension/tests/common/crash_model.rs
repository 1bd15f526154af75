//! The crash model of the crash-injection harnesses (the pmemcheck/pmreorder model): a store
//! that records every store, persist and growth, and the crash images a cut of that record
//! allows: everything persisted before the cut is on the medium; of the stores not yet
//! persisted, each 8-byte word independently keeps the durable value or takes any prefix of its
//! pending stores (dropped, torn at 8 bytes, reordered across words).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nv_extension::persistence::memory::MemoryBackend;
use nv_extension::persistence::{Persistence, PersistenceMode};
use nv_extension::Error;

pub const WORD: u64 = 8;
pub const LINE: u64 = 64;

/// Small deterministic generator (xorshift64*); seeds make failures reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Random bytes, `min..=max` of them.
    pub fn blob(&mut self, min: u64, max: u64) -> Vec<u8> {
        let len = min + self.below(max - min + 1);
        (0..len).map(|_| self.next() as u8).collect()
    }
}

#[derive(Clone, Debug)]
pub enum Event {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Persist {
        offset: u64,
        len: u64,
    },
    Grow {
        len: u64,
    },
    /// A store to the VM's disk image (the file's page cache): lost unless synced.
    DiskWrite {
        offset: u64,
        data: Vec<u8>,
    },
    /// fdatasync of the disk image.
    DiskSync,
}

/// A memory store that logs every store, persist and growth.
pub struct RecordingBackend {
    /// Shared with [`GuestPort`], which writes guest memory the way a vCPU does.
    pub inner: Arc<Mutex<MemoryBackend>>,
    pub log: Arc<Mutex<Vec<Event>>>,
    pub growable: bool,
}

impl Persistence for RecordingBackend {
    fn mode(&self) -> PersistenceMode {
        PersistenceMode::Volatile
    }
    fn len(&self) -> u64 {
        self.inner.lock().unwrap().len()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> nv_extension::Result<()> {
        self.inner.lock().unwrap().read(offset, buf)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> nv_extension::Result<()> {
        self.inner.lock().unwrap().write(offset, data)?;
        self.log.lock().unwrap().push(Event::Write {
            offset,
            data: data.to_vec(),
        });
        Ok(())
    }
    fn persist(&mut self, offset: u64, len: u64) -> nv_extension::Result<()> {
        self.inner.lock().unwrap().persist(offset, len)?;
        self.log
            .lock()
            .unwrap()
            .push(Event::Persist { offset, len });
        Ok(())
    }
    fn grow(&mut self, len: u64) -> nv_extension::Result<()> {
        if !self.growable {
            return Err(Error::CannotGrow("fixed-size test store"));
        }
        self.inner.lock().unwrap().grow(len)?;
        self.log.lock().unwrap().push(Event::Grow { len });
        Ok(())
    }
}

/// Writes guest memory into a recording store as a vCPU does: a store, recorded, never
/// persisted by itself (a checkpoint or a save persists it).
#[derive(Clone)]
pub struct GuestPort {
    pub inner: Arc<Mutex<MemoryBackend>>,
    pub log: Arc<Mutex<Vec<Event>>>,
}

impl GuestPort {
    pub fn of(store: &RecordingBackend) -> Self {
        GuestPort {
            inner: store.inner.clone(),
            log: store.log.clone(),
        }
    }
    pub fn write(&self, offset: u64, data: &[u8]) {
        self.inner.lock().unwrap().write(offset, data).unwrap();
        self.log.lock().unwrap().push(Event::Write {
            offset,
            data: data.to_vec(),
        });
    }
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        self.inner.lock().unwrap().read(offset, &mut bytes).unwrap();
        bytes
    }
    /// Events recorded so far.
    pub fn events(&self) -> usize {
        self.log.lock().unwrap().len()
    }
}

/// Applies one recorded event to the durable image and the pending stores.
pub fn replay_event(event: &Event, durable: &mut Vec<u8>, pending: &mut Pending) {
    match event {
        Event::Write { offset, data } => pending.add(*offset, data),
        Event::Persist { offset, len } => pending.persist(durable, *offset, *len),
        Event::Grow { len } => durable.resize(*len as usize, 0),
        Event::DiskWrite { .. } | Event::DiskSync => {}
    }
}

/// Applies one recorded event to the region's or the disk's durable image and pending stores.
pub fn replay_event_with_disk(
    event: &Event,
    (durable, pending): (&mut Vec<u8>, &mut Pending),
    (disk, disk_pending): (&mut Vec<u8>, &mut Pending),
) {
    match event {
        Event::DiskWrite { offset, data } => disk_pending.add(*offset, data),
        Event::DiskSync => {
            let len = disk.len() as u64;
            disk_pending.persist(disk, 0, len)
        }
        _ => replay_event(event, durable, pending),
    }
}

/// The VM's disk image as the VMM sees it (its page cache), recording every store and sync
/// into the same event log as the region's, in order.
#[derive(Clone)]
pub struct DiskPort {
    pub bytes: Arc<Mutex<Vec<u8>>>,
    pub log: Arc<Mutex<Vec<Event>>>,
    /// Written since the last sync, as the block device's disk tracks it: a quiesce syncs
    /// only such a disk ([`DiskPort::sync_if_written`]).
    unsynced: Arc<AtomicBool>,
}

impl DiskPort {
    pub fn of(store: &RecordingBackend, len: usize) -> Self {
        DiskPort {
            bytes: Arc::new(Mutex::new(vec![0; len])),
            log: store.log.clone(),
            unsynced: Arc::new(AtomicBool::new(true)),
        }
    }
    pub fn write(&self, offset: u64, data: &[u8]) {
        let at = offset as usize;
        self.bytes.lock().unwrap()[at..at + data.len()].copy_from_slice(data);
        self.log.lock().unwrap().push(Event::DiskWrite {
            offset,
            data: data.to_vec(),
        });
        self.unsynced.store(true, Ordering::SeqCst);
    }
    pub fn sync(&self) {
        self.unsynced.store(false, Ordering::SeqCst);
        self.log.lock().unwrap().push(Event::DiskSync);
    }
    /// Syncs only if written since the last sync, as a quiesce's disk flush does.
    pub fn sync_if_written(&self) {
        if self.unsynced.load(Ordering::SeqCst) {
            self.sync();
        }
    }
    /// A new VMM process opened the disk: it cannot know what the last one left unsynced.
    pub fn reopened(&self) {
        self.unsynced.store(true, Ordering::SeqCst);
    }
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        let at = offset as usize;
        buf.copy_from_slice(&self.bytes.lock().unwrap()[at..at + buf.len()]);
    }
    pub fn content(&self) -> Vec<u8> {
        self.bytes.lock().unwrap().clone()
    }
}

impl nv_extension::DiskUndoTarget for DiskPort {
    fn write_disk(
        &mut self,
        disk: u16,
        offset: u64,
        data: &[u8],
    ) -> Result<(), nv_extension::HostError> {
        if disk != 0 {
            return Err(format!("no disk {disk}").into());
        }
        DiskPort::write(self, offset, data);
        Ok(())
    }
    fn sync_disk(&mut self, _: u16) -> Result<(), nv_extension::HostError> {
        self.sync();
        Ok(())
    }
}

/// Pending (not yet persisted) stores, split into 8-byte words.
#[derive(Clone, Default)]
pub struct Pending {
    /// (word offset, offset within the word, bytes) in program order.
    chunks: Vec<(u64, usize, Vec<u8>)>,
}

impl Pending {
    pub fn add(&mut self, offset: u64, data: &[u8]) {
        let mut at = 0usize;
        while at < data.len() {
            let abs = offset + at as u64;
            let word = abs & !(WORD - 1);
            let within = (abs - word) as usize;
            let take = (WORD as usize - within).min(data.len() - at);
            self.chunks
                .push((word, within, data[at..at + take].to_vec()));
            at += take;
        }
    }

    /// Moves every chunk in the cache lines of `[offset, offset + len)` to the durable image.
    pub fn persist(&mut self, image: &mut [u8], offset: u64, len: u64) {
        let start = offset & !(LINE - 1);
        let end = (offset + len).div_ceil(LINE) * LINE;
        self.chunks.retain(|(word, within, bytes)| {
            if *word >= start && *word < end {
                let at = (*word as usize) + within;
                image[at..at + bytes.len()].copy_from_slice(bytes);
                false
            } else {
                true
            }
        });
    }

    /// A crash image: each word takes a random prefix of its pending stores.
    pub fn crash_image(&self, durable: &[u8], rng: &mut Rng, variant: usize) -> Vec<u8> {
        let mut image = durable.to_vec();
        let mut per_word: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, (word, _, _)) in self.chunks.iter().enumerate() {
            per_word.entry(*word).or_default().push(i);
        }
        for indices in per_word.values() {
            let n = indices.len() as u64;
            let keep = match variant {
                0 => 0,                // nothing pending reached the medium
                1 => rng.below(n + 1), // any prefix per word
                _ => {
                    if rng.below(2) == 0 {
                        0
                    } else {
                        n
                    }
                } // whole word history or none
            };
            for &i in &indices[..keep as usize] {
                let (word, within, bytes) = &self.chunks[i];
                let at = (*word as usize) + within;
                image[at..at + bytes.len()].copy_from_slice(bytes);
            }
        }
        image
    }
}

/// Whether libtest-style arguments select the one test this harness is.
pub fn selected_by(name: &str, args: Vec<String>) -> bool {
    const TAKES_VALUE: [&str; 6] = [
        "--test-threads",
        "--skip",
        "--format",
        "--color",
        "--logfile",
        "-Z",
    ];
    if args.iter().any(|a| a == "--list") {
        println!("{name}: test");
        return false;
    }
    if args.iter().any(|a| a == "--ignored") {
        return false; // this harness is not an ignored test
    }
    let exact = args.iter().any(|a| a == "--exact");
    let mut filters = Vec::new();
    let mut skips = Vec::new();
    let mut iter = args.iter().peekable();
    while let Some(arg) = iter.next() {
        if TAKES_VALUE.contains(&arg.as_str()) {
            if let Some(value) = iter.next() {
                if arg == "--skip" {
                    skips.push(value.clone());
                }
            }
        } else if !arg.starts_with('-') {
            filters.push(arg.clone());
        }
    }
    let matches = |pattern: &String| {
        if exact {
            name == pattern
        } else {
            name.contains(pattern.as_str())
        }
    };
    (filters.is_empty() || filters.iter().any(matches)) && !skips.iter().any(matches)
}

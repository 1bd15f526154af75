//! I/O counters of a block device, as upstream reports them in `vm.counters`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Updated by the I/O thread, read by the API thread; relaxed ordering is enough for statistics.
#[derive(Default)]
pub(crate) struct BlockCounters {
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    read_ops: AtomicU64,
    write_ops: AtomicU64,
}

impl BlockCounters {
    pub(crate) fn record_read(&self, bytes: u64) {
        self.read_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.read_ops.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_write(&self, bytes: u64) {
        self.write_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.write_ops.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        BTreeMap::from([
            ("read_bytes", self.read_bytes.load(Ordering::Relaxed)),
            ("write_bytes", self.write_bytes.load(Ordering::Relaxed)),
            ("read_ops", self.read_ops.load(Ordering::Relaxed)),
            ("write_ops", self.write_ops.load(Ordering::Relaxed)),
        ])
    }
}

//! MSI-X: the capability in configuration space, the vector table and the pending-bit array in
//! a BAR, and delivery that honours the per-vector and function masks.

use std::io;
use std::sync::Arc;

use log::warn;
use serde::{Deserialize, Serialize};

use super::{check_state_version, PciConfiguration, PciError, PciResult, BAR_COUNT};

/// Capability ID of MSI-X.
pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// Message control bits.
pub const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
pub const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Bytes per table entry: message address low, high, data, vector control.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Vector control bit: the vector is masked.
pub const MSIX_VECTOR_MASKED: u32 = 1;
/// Table size field is 11 bits.
pub const MSIX_MAX_VECTORS: usize = 2048;
/// Version of [`MsixState`].
pub const MSIX_STATE_VERSION: u32 = 1;

/// Where MSI-X messages go. The VMM implements it with a KVM GSI route per vector (`route`) and
/// an irqfd bound to that GSI (`trigger`); tests record the calls.
pub trait MsiInterruptSink: Send + Sync {
    /// Vector `vector` now sends `data` to `address`.
    fn route(&self, vector: u16, address: u64, data: u32) -> io::Result<()>;
    /// Sends vector `vector`'s message once.
    fn trigger(&self, vector: u16) -> io::Result<()>;
}

/// What happened to an interrupt the device raised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsixDelivery {
    /// Sent to the sink.
    Delivered,
    /// The vector or the function is masked: its pending bit is set and the message goes out on
    /// unmask.
    Pending,
    /// MSI-X is disabled; this platform has no INTx fallback, so nothing is sent.
    Disabled,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntryState {
    pub address_low: u32,
    pub address_high: u32,
    pub data: u32,
    pub vector_control: u32,
}

impl MsixEntryState {
    fn masked(&self) -> bool {
        self.vector_control & MSIX_VECTOR_MASKED != 0
    }
    fn address(&self) -> u64 {
        u64::from(self.address_low) | (u64::from(self.address_high) << 32)
    }
}

/// Saved MSI-X state: table, pending bits, enable and function mask.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub version: u32,
    pub entries: Vec<MsixEntryState>,
    pub pending: Vec<u64>,
    pub enabled: bool,
    pub function_masked: bool,
}

/// MSI-X structures take naturally aligned dword and qword accesses only.
fn dword_or_qword(offset: u64, len: usize) -> bool {
    matches!(len, 4 | 8) && offset.is_multiple_of(len as u64)
}

/// The MSI-X model of one function.
pub struct MsixConfig {
    entries: Vec<MsixEntryState>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    capability_offset: Option<u16>,
    sink: Arc<dyn MsiInterruptSink>,
}

impl MsixConfig {
    /// A table of `vectors` entries, all masked (their reset state), MSI-X disabled.
    pub fn new(vectors: usize, sink: Arc<dyn MsiInterruptSink>) -> PciResult<Self> {
        if vectors == 0 || vectors > MSIX_MAX_VECTORS {
            return Err(PciError::MsixVectorCount(vectors));
        }
        Ok(Self {
            entries: vec![
                MsixEntryState {
                    vector_control: MSIX_VECTOR_MASKED,
                    ..Default::default()
                };
                vectors
            ],
            pending: vec![0; vectors.div_ceil(64)],
            enabled: false,
            function_masked: false,
            capability_offset: None,
            sink,
        })
    }

    /// Loads `state` into this model, built by the same device (same vector count, capability
    /// already added), and re-announces every vector's route (KVM's routes do not survive the
    /// VMM). Pending bits stay pending until the guest unmasks.
    pub fn restore(&mut self, state: &MsixState) -> PciResult<()> {
        check_state_version(state.version, MSIX_STATE_VERSION)?;
        if state.entries.len() != self.entries.len() || state.pending.len() != self.pending.len() {
            return Err(PciError::StateMismatch(
                "MSI-X table or pending bit array size",
            ));
        }
        self.entries.clone_from(&state.entries);
        // Bits beyond the table do not exist.
        self.pending.clone_from(&state.pending);
        if let Some(last) = self.pending.last_mut() {
            let used = self.entries.len() % 64;
            if used != 0 {
                *last &= (1u64 << used) - 1;
            }
        }
        self.enabled = state.enabled;
        self.function_masked = state.function_masked;
        for vector in 0..self.entries.len() {
            self.announce_route(vector);
        }
        Ok(())
    }

    pub fn state(&self) -> MsixState {
        MsixState {
            version: MSIX_STATE_VERSION,
            entries: self.entries.clone(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Number of vectors.
    pub fn vectors(&self) -> usize {
        self.entries.len()
    }

    /// Bytes the table takes in its BAR.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * MSIX_ENTRY_SIZE
    }

    /// Bytes the pending-bit array takes in its BAR.
    pub fn pba_size(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    /// Whether `vector`'s pending bit is set.
    pub fn is_pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        self.pending
            .get(v / 64)
            .is_some_and(|word| word & (1 << (v % 64)) != 0)
    }

    /// Adds the MSI-X capability to `config`, with the table at `table_offset` in BAR
    /// `table_bar` and the pending bits at `pba_offset` in BAR `pba_bar` (both BARs declared
    /// already, offsets 8-byte aligned). Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        config: &mut PciConfiguration,
        (table_bar, table_offset): (usize, u64),
        (pba_bar, pba_offset): (usize, u64),
    ) -> PciResult<u16> {
        for (what, bar, offset, len) in [
            ("table", table_bar, table_offset, self.table_size()),
            ("pending bit array", pba_bar, pba_offset, self.pba_size()),
        ] {
            let fits = bar < BAR_COUNT
                && offset % 8 == 0
                && offset <= u64::from(u32::MAX)
                && config
                    .bar(bar)
                    .is_some_and(|b| offset.checked_add(len).is_some_and(|end| end <= b.size));
            if !fits {
                return Err(PciError::MsixPlacement { what, bar, offset });
            }
        }
        let control = (self.entries.len() - 1) as u16;
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&control.to_le_bytes());
        body.extend_from_slice(&(table_offset as u32 | table_bar as u32).to_le_bytes());
        body.extend_from_slice(&(pba_offset as u32 | pba_bar as u32).to_le_bytes());
        let writable_control = ((MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK) >> 8) as u8;
        let offset = config.add_capability(MSIX_CAPABILITY_ID, &body, &[0, writable_control])?;
        self.capability_offset = Some(offset);
        Ok(offset)
    }

    /// Call after every guest configuration write at `offset` of `len` bytes: picks up a new
    /// enable or function mask from the message control register and sends what became
    /// deliverable.
    pub fn config_written(&mut self, config: &PciConfiguration, offset: u16, len: usize) {
        let Some(capability) = self.capability_offset else {
            return;
        };
        let control_at = capability + 2;
        let end = usize::from(offset) + len;
        if usize::from(offset) < usize::from(control_at) + 2 && end > usize::from(control_at) {
            self.set_message_control(config.read_u16(control_at));
        }
    }

    /// Applies a message control value (enable and function mask bits).
    pub fn set_message_control(&mut self, control: u16) {
        self.enabled = control & MSIX_CONTROL_ENABLE != 0;
        self.function_masked = control & MSIX_CONTROL_FUNCTION_MASK != 0;
        for vector in 0..self.entries.len() {
            self.deliver_if_pending(vector);
        }
    }

    /// The device raises `vector`.
    pub fn trigger(&mut self, vector: u16) -> PciResult<MsixDelivery> {
        let v = usize::from(vector);
        let entry = self.entries.get(v).ok_or(PciError::MsixVectorOutOfRange {
            vector,
            count: self.entries.len(),
        })?;
        if !self.enabled {
            return Ok(MsixDelivery::Disabled);
        }
        if self.function_masked || entry.masked() {
            self.pending[v / 64] |= 1 << (v % 64);
            return Ok(MsixDelivery::Pending);
        }
        self.send(v);
        Ok(MsixDelivery::Delivered)
    }

    fn send(&self, vector: usize) {
        if let Err(e) = self.sink.trigger(vector as u16) {
            warn!("msix: cannot send vector {vector}: {e}");
        }
    }

    fn announce_route(&self, vector: usize) {
        let entry = &self.entries[vector];
        if let Err(e) = self.sink.route(vector as u16, entry.address(), entry.data) {
            warn!("msix: cannot route vector {vector}: {e}");
        }
    }

    fn deliver_if_pending(&mut self, vector: usize) {
        let bit = 1u64 << (vector % 64);
        if self.enabled
            && !self.function_masked
            && !self.entries[vector].masked()
            && self.pending[vector / 64] & bit != 0
        {
            self.pending[vector / 64] &= !bit;
            self.send(vector);
        }
    }

    /// Table accesses are a dword or, at an 8-byte boundary, a qword; others read all-ones.
    fn table_access(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        if !dword_or_qword(offset, len) {
            return None;
        }
        let vector = usize::try_from(offset / MSIX_ENTRY_SIZE).ok()?;
        (vector < self.entries.len()).then_some((vector, (offset % MSIX_ENTRY_SIZE) as usize / 4))
    }

    /// A guest read of the table at `offset` from its start.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
        let Some((vector, first)) = self.table_access(offset, data.len()) else {
            return;
        };
        let e = &self.entries[vector];
        let words = [e.address_low, e.address_high, e.data, e.vector_control];
        for (chunk, word) in data.chunks_mut(4).zip(&words[first..]) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
    }

    /// A guest write of the table at `offset`: a changed address or data re-routes the vector,
    /// an unmask sends a pending message.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some((vector, first)) = self.table_access(offset, data.len()) else {
            return;
        };
        let before = self.entries[vector];
        for (i, chunk) in data.chunks(4).enumerate() {
            let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let entry = &mut self.entries[vector];
            match first + i {
                0 => entry.address_low = value,
                1 => entry.address_high = value,
                2 => entry.data = value,
                // Only the mask bit of vector control is defined; the rest reads zero.
                _ => entry.vector_control = value & MSIX_VECTOR_MASKED,
            }
        }
        let after = self.entries[vector];
        if (after.address(), after.data) != (before.address(), before.data) {
            self.announce_route(vector);
        }
        if before.masked() && !after.masked() {
            self.deliver_if_pending(vector);
        }
    }

    /// A guest read of the pending-bit array (read-only; writes are ignored).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
        if !dword_or_qword(offset, data.len()) {
            return;
        }
        let Some(word) = usize::try_from(offset / 8)
            .ok()
            .and_then(|i| self.pending.get(i))
        else {
            return;
        };
        let bytes = word.to_le_bytes();
        let start = (offset % 8) as usize;
        data.copy_from_slice(&bytes[start..start + data.len()]);
    }
}

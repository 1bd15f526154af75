//! The swap file format (docs/multi-vm.md, "Swap file format"), its writer and its verifying
//! reader.
//!
//! A file is: a header area (a fixed record, the VM name and the region path, zero-padded to a
//! multiple of 4 KiB); one chunk record per 2 MiB chunk of guest memory that has a page to keep,
//! in ascending order (a fixed record with a bitmap of the chunk's present pages and their
//! checksum, then those pages); the state blob; the config blob; a trailer holding the file's
//! size and the CRC32C of every byte before it. Pages never written (holes of the region file)
//! and pages of zeros are absent: they read as zero after a swap-in. Everything is written in
//! large sequential batches; the reader checks every checksum and names what is wrong.

use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result, SwapFileProblem};
use crate::identity::Uuid;
use crate::le_bytes::{le_record, trailing_crc_holds, trailing_crc_of};
use crate::le_bytes::{FromBytes, IntoBytes, U16, U32, U64};
use crate::swap::SwapFileSummary;

pub const MAGIC: [u8; 8] = *b"NVHVSWAP";
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 128;
pub const CHUNK_HEADER_LEN: usize = 96;
pub const BLOB_HEADER_LEN: usize = 32;
pub const TRAILER_LEN: usize = 64;
pub const PAGE_SIZE: u64 = 4096;
pub const CHUNK_PAGES: u64 = 512;
pub const CHUNK_SIZE: u64 = CHUNK_PAGES * PAGE_SIZE;
/// The header area is a multiple of this, and at most `MAX_HEADER_AREA`.
const HEADER_ALIGN: usize = 4096;
const MAX_HEADER_AREA: usize = 2 * HEADER_ALIGN;
/// Longest region path a file records.
pub const MAX_REGION_PATH_LEN: usize = MAX_HEADER_AREA - HEADER_LEN - crate::vm_table::MAX_NAME_LEN;
const CHUNK_MAGIC: [u8; 8] = *b"NVSWCHNK";
const STATE_MAGIC: [u8; 8] = *b"NVSWSTAT";
const CONFIG_MAGIC: [u8; 8] = *b"NVSWCONF";
const TRAILER_MAGIC: [u8; 8] = *b"NVSWTRLR";
/// Bytes gathered before one `write`.
const BATCH: usize = 16 << 20;
/// Largest state or config blob a file may hold (a state slot is far smaller).
pub const MAX_BLOB_LEN: u64 = 1 << 30;

le_record! {
    /// The fixed header at offset 0; the VM name and the region path follow it.
    struct Header(HEADER_LEN) {
        0 => magic: [u8; 8],
        8 => version: U32,
        12 => header_area_len: U32,
        16 => region_uuid: [u8; 16],
        32 => vm_uuid: [u8; 16],
        48 => memory_size: U64,
        56 => seq: U64,
        64 => chunk_size: U32,
        68 => page_size: U32,
        72 => name_len: U16,
        74 => region_path_len: U16,
        /// CRC32C of the name and path bytes.
        76 => strings_crc: U32,
        80 => reserved: [u8; 44],
        /// CRC32C of the bytes before it.
        124 => crc: U32,
    }
}

le_record! {
    /// One chunk of memory with a page to keep; its present pages follow it.
    struct ChunkHeader(CHUNK_HEADER_LEN) {
        0 => magic: [u8; 8],
        /// Chunk number: the chunk covers memory `[index * chunk_size, +chunk_size)`.
        8 => index: U64,
        16 => page_count: U32,
        /// CRC32C of the present pages, in order.
        20 => data_crc: U32,
        /// Bit `i` (byte `i / 8`, bit `i % 8`) set: page `i` of the chunk is in the file.
        24 => bitmap: [u8; 64],
        88 => reserved: [u8; 4],
        92 => crc: U32,
    }
}

le_record! {
    /// The state or the config blob; its bytes follow, padded to 8.
    struct BlobHeader(BLOB_HEADER_LEN) {
        0 => magic: [u8; 8],
        8 => len: U64,
        16 => data_crc: U32,
        20 => reserved: [u8; 8],
        28 => crc: U32,
    }
}

le_record! {
    /// The last bytes of the file.
    struct Trailer(TRAILER_LEN) {
        0 => magic: [u8; 8],
        8 => chunk_records: U64,
        16 => pages: U64,
        /// Size of the whole file, trailer included.
        24 => file_size: U64,
        /// CRC32C of every byte before the trailer.
        32 => file_crc: U32,
        36 => reserved: [u8; 24],
        60 => crc: U32,
    }
}

/// Who a swap file belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SwapMeta {
    pub name: String,
    pub vm_uuid: Uuid,
    pub region_uuid: Uuid,
    pub region_path: PathBuf,
    pub memory_size: u64,
    pub seq: u64,
}

/// What the writer produced.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Written {
    pub file_size: u64,
    pub checksum: u32,
    pub memory_bytes: u64,
}

/// A verified file's contents (memory excepted: a reader's sink gets that).
#[derive(Clone, Debug)]
pub(crate) struct Contents {
    pub checksum: u32,
    pub state: Vec<u8>,
    pub config: Vec<u8>,
    /// The memory the file holds pages of: (offset, len) runs, ascending, adjacent runs merged.
    pub present: Vec<(u64, u64)>,
}

fn padded(len: usize) -> usize {
    len.div_ceil(8) * 8
}

fn header_area_len(meta: &SwapMeta) -> usize {
    (HEADER_LEN + meta.name.len() + meta.region_path.as_os_str().len()).div_ceil(HEADER_ALIGN)
        * HEADER_ALIGN
}

/// Whether a page holds only zeros (OR-folded in 64-byte blocks, which vectorises).
fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(64)
        .all(|block| block.iter().fold(0u8, |acc, b| acc | b) == 0)
}

/// The header area of a file for `meta`.
fn encode_header(meta: &SwapMeta) -> Result<Vec<u8>> {
    let path = meta.region_path.as_os_str().as_bytes();
    if path.len() > MAX_REGION_PATH_LEN {
        return Err(Error::Unsupported(format!(
            "region path of {} bytes is too long for a swap file (at most {MAX_REGION_PATH_LEN})",
            path.len()
        )));
    }
    let mut strings = meta.name.as_bytes().to_vec();
    strings.extend_from_slice(path);
    let area_len = header_area_len(meta);
    let mut header = Header {
        magic: MAGIC,
        version: FORMAT_VERSION.into(),
        header_area_len: (area_len as u32).into(),
        region_uuid: meta.region_uuid.0,
        vm_uuid: meta.vm_uuid.0,
        memory_size: meta.memory_size.into(),
        seq: meta.seq.into(),
        chunk_size: (CHUNK_SIZE as u32).into(),
        page_size: (PAGE_SIZE as u32).into(),
        name_len: (meta.name.len() as u16).into(),
        region_path_len: (path.len() as u16).into(),
        strings_crc: crc32c::crc32c(&strings).into(),
        reserved: [0; 44],
        crc: U32::ZERO,
    };
    header.crc = trailing_crc_of(&header).into();
    let mut area = header.as_bytes().to_vec();
    area.extend_from_slice(&strings);
    area.resize(area_len, 0);
    Ok(area)
}

/// Gathers the file in memory batches and writes each with one `write_all`, keeping the
/// running checksum of everything gathered (each byte is summed once: a chunk's pages by their
/// own checksum, combined into the running one).
struct BatchWriter<'a> {
    out: &'a mut File,
    path: &'a Path,
    buf: Vec<u8>,
    written: u64,
    crc: u32,
}

impl BatchWriter<'_> {
    /// Appends bytes and sums them.
    fn push(&mut self, bytes: &[u8]) {
        self.crc = crc32c::crc32c_append(self.crc, bytes);
        self.buf.extend_from_slice(bytes);
    }

    fn flush(&mut self) -> Result<()> {
        self.out
            .write_all(&self.buf)
            .map_err(|e| Error::io(format!("writing swap file {}", self.path.display()), e))?;
        self.written += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    fn blob(&mut self, magic: [u8; 8], data: &[u8]) {
        let mut header = BlobHeader {
            magic,
            len: (data.len() as u64).into(),
            data_crc: crc32c::crc32c(data).into(),
            reserved: [0; 8],
            crc: U32::ZERO,
        };
        header.crc = trailing_crc_of(&header).into();
        self.push(header.as_bytes());
        self.push(data);
        self.push(&[0; 8][..padded(data.len()) - data.len()]);
    }
}

/// What the writer puts in the file besides the header: the VM's memory, state and config.
pub(crate) struct SwapSource<'a> {
    /// Ranges (relative to the start of memory, page aligned, ascending) that may hold
    /// data; everything outside them reads as zero and is not read at all.
    pub data_ranges: Vec<(u64, u64)>,
    /// Reads memory at a (page-aligned) offset into the buffer.
    pub read: &'a mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    pub state: &'a [u8],
    pub config: &'a [u8],
}

/// Receives loaded memory: (offset in guest memory, bytes of consecutive pages). It runs on a
/// thread of its own, so that writing one batch overlaps reading the next.
pub(crate) type PageSink<'a> = &'a mut (dyn FnMut(u64, &[u8]) -> Result<()> + Send);

/// Writes a complete swap file for `meta` to `out` (positioned at 0). `after_memory` runs once
/// the memory is written (a fault point: the file is then incomplete).
pub(crate) fn write(
    out: &mut File,
    path: &Path,
    meta: &SwapMeta,
    memory: SwapSource<'_>,
    progress: &mut dyn FnMut(u64),
    after_memory: &mut dyn FnMut(),
) -> Result<Written> {
    for blob in [memory.state, memory.config] {
        if blob.len() as u64 > MAX_BLOB_LEN {
            return Err(Error::StateTooLarge {
                len: blob.len() as u64,
                capacity: MAX_BLOB_LEN,
            });
        }
    }
    let mut writer = BatchWriter {
        out,
        path,
        buf: Vec::with_capacity(BATCH + CHUNK_SIZE as usize + CHUNK_HEADER_LEN),
        written: 0,
        crc: 0,
    };
    writer.push(&encode_header(meta)?);
    let (mut chunk_records, mut pages) = (0u64, 0u64);
    let chunk_count = meta.memory_size.div_ceil(CHUNK_SIZE);
    let mut ranges = memory.data_ranges.iter().peekable();
    for index in 0..chunk_count {
        let start = index * CHUNK_SIZE;
        let end = (start + CHUNK_SIZE).min(meta.memory_size);
        // Which pages of this chunk may hold data.
        let mut maybe = [false; CHUNK_PAGES as usize];
        let mut any = false;
        while let Some(&&(from, to)) = ranges.peek() {
            if from >= end {
                break;
            }
            let (from, to) = (from.max(start), to.min(end));
            if from < to {
                let first = ((from - start) / PAGE_SIZE) as usize;
                let last = (to - start).div_ceil(PAGE_SIZE) as usize;
                maybe[first..last].iter_mut().for_each(|m| *m = true);
                any = true;
            }
            if to >= end {
                break;
            }
            ranges.next();
        }
        if any {
            let record_at = writer.buf.len();
            let data_at = record_at + CHUNK_HEADER_LEN;
            let chunk_pages = (end - start).div_ceil(PAGE_SIZE) as usize;
            writer
                .buf
                .resize(data_at + chunk_pages * PAGE_SIZE as usize, 0);
            // Read each run of maybe-data pages straight into place.
            let mut page = 0;
            while page < chunk_pages {
                if !maybe[page] {
                    page += 1;
                    continue;
                }
                let run_end = (page..chunk_pages)
                    .find(|p| !maybe[*p])
                    .unwrap_or(chunk_pages);
                let at = data_at + page * PAGE_SIZE as usize;
                let len = (run_end - page) * PAGE_SIZE as usize;
                (memory.read)(
                    start + page as u64 * PAGE_SIZE,
                    &mut writer.buf[at..at + len],
                )?;
                page = run_end;
            }
            // Keep the non-zero pages, moved down over the dropped ones.
            let mut bitmap = [0u8; 64];
            let mut kept = 0usize;
            for (page, maybe) in maybe.iter().enumerate().take(chunk_pages) {
                let from = data_at + page * PAGE_SIZE as usize;
                if !maybe || is_zero(&writer.buf[from..from + PAGE_SIZE as usize]) {
                    continue;
                }
                let to = data_at + kept * PAGE_SIZE as usize;
                if to != from {
                    writer.buf.copy_within(from..from + PAGE_SIZE as usize, to);
                }
                bitmap[page / 8] |= 1 << (page % 8);
                kept += 1;
            }
            let data_end = data_at + kept * PAGE_SIZE as usize;
            if kept == 0 {
                writer.buf.truncate(record_at);
            } else {
                let data_crc = crc32c::crc32c(&writer.buf[data_at..data_end]);
                let mut header = ChunkHeader {
                    magic: CHUNK_MAGIC,
                    index: index.into(),
                    page_count: (kept as u32).into(),
                    data_crc: data_crc.into(),
                    bitmap,
                    reserved: [0; 4],
                    crc: U32::ZERO,
                };
                header.crc = trailing_crc_of(&header).into();
                writer.buf[record_at..data_at].copy_from_slice(header.as_bytes());
                writer.buf.truncate(data_end);
                writer.crc = crc32c::crc32c_combine(
                    crc32c::crc32c_append(writer.crc, header.as_bytes()),
                    data_crc,
                    data_end - data_at,
                );
                chunk_records += 1;
                pages += kept as u64;
            }
            if writer.buf.len() >= BATCH {
                writer.flush()?;
            }
        }
        progress(end);
    }
    writer.flush()?;
    after_memory();
    writer.blob(STATE_MAGIC, memory.state);
    writer.blob(CONFIG_MAGIC, memory.config);
    writer.flush()?;
    let file_size = writer.written + TRAILER_LEN as u64;
    let mut trailer = Trailer {
        magic: TRAILER_MAGIC,
        chunk_records: chunk_records.into(),
        pages: pages.into(),
        file_size: file_size.into(),
        file_crc: writer.crc.into(),
        reserved: [0; 24],
        crc: U32::ZERO,
    };
    trailer.crc = trailing_crc_of(&trailer).into();
    let checksum = writer.crc;
    writer.buf.extend_from_slice(trailer.as_bytes()); // not part of the file checksum
    writer.flush()?;
    Ok(Written {
        file_size,
        checksum,
        memory_bytes: pages * PAGE_SIZE,
    })
}

fn problem(path: &Path, problem: SwapFileProblem) -> Error {
    Error::SwapFile {
        path: path.to_path_buf(),
        problem,
    }
}

fn corrupt(path: &Path, what: impl Into<String>) -> Error {
    problem(path, SwapFileProblem::Corrupt(what.into()))
}

fn open(path: &Path) -> Result<(File, u64)> {
    let file = File::open(path)
        .map_err(|e| Error::io(format!("opening swap file {}", path.display()), e))?;
    let metadata = file
        .metadata()
        .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
    if !metadata.is_file() {
        return Err(corrupt(path, "not a regular file"));
    }
    Ok((file, metadata.len()))
}

/// Decodes and checks the header area (read whole into `area`); returns the metadata and the
/// area's length.
fn decode_header(path: &Path, file: &File, size: u64) -> Result<(SwapMeta, usize)> {
    let truncated = |detail: &str| {
        problem(
            path,
            SwapFileProblem::Truncated {
                size,
                detail: detail.to_string(),
            },
        )
    };
    let mut fixed = [0u8; HEADER_LEN];
    let available = size.min(HEADER_LEN as u64) as usize;
    file.read_exact_at(&mut fixed[..available], 0)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if available < MAGIC.len() {
        return Err(if fixed[..available] == MAGIC[..available] {
            truncated("shorter than a header")
        } else {
            problem(path, SwapFileProblem::ForeignMagic)
        });
    }
    if fixed[..8] != MAGIC {
        return Err(problem(path, SwapFileProblem::ForeignMagic));
    }
    if available < HEADER_LEN {
        return Err(truncated("shorter than a header"));
    }
    let header = Header::ref_from_bytes(&fixed[..]).expect("exact size");
    let crc_ok = trailing_crc_holds(header);
    let version = header.version.get();
    if version != FORMAT_VERSION {
        // Only believe the version if the header is intact: a bit flip is damage.
        return Err(if crc_ok {
            problem(
                path,
                SwapFileProblem::FutureVersion {
                    found: version,
                    supported: FORMAT_VERSION,
                },
            )
        } else {
            corrupt(path, "header checksum mismatch")
        });
    }
    if !crc_ok {
        return Err(corrupt(path, "header checksum mismatch"));
    }
    let area_len = header.header_area_len.get() as usize;
    let name_len = header.name_len.get() as usize;
    let path_len = header.region_path_len.get() as usize;
    if area_len > MAX_HEADER_AREA
        || !area_len.is_multiple_of(HEADER_ALIGN)
        || HEADER_LEN + name_len + path_len > area_len
    {
        return Err(corrupt(path, "header area length out of range"));
    }
    if header.chunk_size.get() as u64 != CHUNK_SIZE || header.page_size.get() as u64 != PAGE_SIZE {
        return Err(corrupt(path, "unsupported chunk or page size"));
    }
    if size < area_len as u64 {
        return Err(truncated("ends inside its header"));
    }
    let mut strings = vec![0u8; name_len + path_len];
    file.read_exact_at(&mut strings, HEADER_LEN as u64)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if crc32c::crc32c(&strings) != header.strings_crc.get() {
        return Err(corrupt(path, "VM name or region path checksum mismatch"));
    }
    let name = std::str::from_utf8(&strings[..name_len])
        .ok()
        .filter(|name| crate::vm_table::validate_name(name).is_ok())
        .ok_or_else(|| corrupt(path, "invalid VM name"))?
        .to_string();
    let meta = SwapMeta {
        name,
        vm_uuid: Uuid(header.vm_uuid),
        region_uuid: Uuid(header.region_uuid),
        region_path: std::ffi::OsStr::from_bytes(&strings[name_len..]).into(),
        memory_size: header.memory_size.get(),
        seq: header.seq.get(),
    };
    if meta.memory_size == 0 || !meta.memory_size.is_multiple_of(PAGE_SIZE) {
        return Err(corrupt(path, "impossible memory size"));
    }
    Ok((meta, area_len))
}

/// The header of the file at `path` (cheap: the file is not verified).
pub(crate) fn inspect(path: &Path) -> Result<SwapFileSummary> {
    let (file, size) = open(path)?;
    let (meta, _) = decode_header(path, &file, size)?;
    Ok(SwapFileSummary {
        vm_name: meta.name,
        vm_uuid: meta.vm_uuid,
        region_uuid: meta.region_uuid,
        region_path: meta.region_path,
        memory_size: meta.memory_size,
        seq: meta.seq,
        file_size: size,
    })
}

/// A run of present pages in the reader's current buffer, queued for the sink.
struct SinkRun {
    /// Memory offset of the first page.
    offset: u64,
    from: usize,
    to: usize,
}

/// The reader's side of the pipeline to the sink's thread: full buffers (with the runs to load
/// from them) go out, emptied ones come back.
struct Handoff {
    to_sink: std::sync::mpsc::SyncSender<(Vec<u8>, Vec<SinkRun>)>,
    free: std::sync::mpsc::Receiver<Vec<u8>>,
}

fn loader_gone() -> Error {
    Error::io(
        "loading guest memory",
        std::io::Error::other("the loading thread stopped"),
    )
}

/// Reads a file front to back in large blocks, keeping the checksum of what it consumed.
struct SeqReader<'a> {
    file: &'a File,
    path: &'a Path,
    /// Where reading stops.
    size: u64,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// File offset of `buf[start]`.
    pos: u64,
    crc: u32,
    /// Runs of `buf` (verified) that the sink has not got yet.
    pending: Vec<SinkRun>,
    handoff: Option<Handoff>,
}

impl<'a> SeqReader<'a> {
    fn new(file: &'a File, path: &'a Path, buf: Vec<u8>) -> Self {
        SeqReader {
            file,
            path,
            size: 0,
            buf,
            start: 0,
            end: 0,
            pos: 0,
            crc: 0,
            pending: Vec::new(),
            handoff: None,
        }
    }

    /// Sends the current buffer with its pending runs to the sink's thread and continues in an
    /// emptied buffer, holding the bytes not consumed yet.
    fn switch_buffer(&mut self) -> Result<()> {
        let handoff = self.handoff.as_ref().expect("only with a sink");
        let mut next = handoff.free.recv().map_err(|_| loader_gone())?;
        if next.len() < self.buf.len() {
            next.resize(self.buf.len(), 0);
        }
        let unconsumed = self.end - self.start;
        next[..unconsumed].copy_from_slice(&self.buf[self.start..self.end]);
        let full = std::mem::replace(&mut self.buf, next);
        (self.start, self.end) = (0, unconsumed);
        handoff
            .to_sink
            .send((full, std::mem::take(&mut self.pending)))
            .map_err(|_| loader_gone())
    }

    /// Hands the last runs to the sink's thread and closes the pipeline.
    fn hand_off(&mut self) -> Result<()> {
        if let Some(handoff) = self.handoff.take() {
            let runs = std::mem::take(&mut self.pending);
            handoff
                .to_sink
                .send((std::mem::take(&mut self.buf), runs))
                .map_err(|_| loader_gone())?;
        }
        Ok(())
    }

    /// Makes `n` bytes available at `buf[start..]`; `false` at the end of the file.
    fn fill(&mut self, n: usize) -> Result<bool> {
        if self.end - self.start >= n {
            return Ok(true);
        }
        if self.start + n > self.buf.len() {
            if self.pending.is_empty() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                // The sink has yet to load from this buffer: move on to another one.
                self.switch_buffer()?;
            }
        }
        if n > self.buf.len() {
            // A blob larger than the batch buffer (bounded by MAX_BLOB_LEN).
            self.buf
                .try_reserve_exact(n - self.buf.len())
                .map_err(|_| {
                    Error::io(
                        "reading a swap file",
                        std::io::ErrorKind::OutOfMemory.into(),
                    )
                })?;
            self.buf.resize(n, 0);
        }
        while self.end - self.start < n {
            let at = self.pos + (self.end - self.start) as u64;
            if at >= self.size {
                return Ok(false);
            }
            let want = (self.buf.len() - self.end).min((self.size - at) as usize);
            let got = self
                .file
                .read_at(&mut self.buf[self.end..self.end + want], at)
                .map_err(|e| Error::io(format!("reading {}", self.path.display()), e))?;
            if got == 0 {
                return Ok(false);
            }
            self.end += got;
        }
        Ok(true)
    }

    /// Takes `n` bytes (into the running checksum); `None` when the file ends first.
    fn take(&mut self, n: usize) -> Result<Option<&[u8]>> {
        let Some((from, to)) = self.take_unsummed(n)? else {
            return Ok(None);
        };
        self.crc = crc32c::crc32c_append(self.crc, &self.buf[from..to]);
        Ok(Some(&self.buf[from..to]))
    }

    /// Takes `n` bytes without summing them: the caller sums them once and hands the sum to
    /// [`SeqReader::add_sum`]. Returns their range in `buf`.
    fn take_unsummed(&mut self, n: usize) -> Result<Option<(usize, usize)>> {
        if !self.fill(n)? {
            return Ok(None);
        }
        let (from, to) = (self.start, self.start + n);
        self.start = to;
        self.pos += n as u64;
        Ok(Some((from, to)))
    }

    /// Adds the checksum of `len` bytes taken unsummed to the running checksum.
    fn add_sum(&mut self, crc: u32, len: usize) {
        self.crc = crc32c::crc32c_combine(self.crc, crc, len);
    }

    fn peek_magic(&mut self) -> Result<Option<[u8; 8]>> {
        if !self.fill(8)? {
            return Ok(None);
        }
        Ok(Some(
            self.buf[self.start..self.start + 8].try_into().expect("8"),
        ))
    }
}

/// What the cheap checks of a file found: its header and its trailer, intact and consistent
/// with the file's size. The body is not read yet.
pub(crate) struct Checked {
    file: File,
    area_len: usize,
    pub meta: SwapMeta,
    pub file_size: u64,
    /// The final checksum the trailer claims (a full read proves it).
    pub claimed_checksum: u32,
    chunk_records: u64,
    pages: u64,
}

/// Checks the header and the trailer of the file at `path` (two small reads).
pub(crate) fn check(path: &Path) -> Result<Checked> {
    let (file, size) = open(path)?;
    let (meta, area_len) = decode_header(path, &file, size)?;
    let truncated = |detail: String| problem(path, SwapFileProblem::Truncated { size, detail });
    // The trailer first: a file cut short has none, and that is the clearest thing to say.
    if size < (area_len + TRAILER_LEN) as u64 {
        return Err(truncated("ends before its trailer".into()));
    }
    let mut trailer = [0u8; TRAILER_LEN];
    file.read_exact_at(&mut trailer, size - TRAILER_LEN as u64)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let trailer = Trailer::ref_from_bytes(&trailer[..]).expect("exact size");
    if trailer.magic != TRAILER_MAGIC {
        return Err(truncated(
            "no trailer at its end (incomplete write?)".into(),
        ));
    }
    if !trailing_crc_holds(trailer) {
        return Err(corrupt(path, "trailer checksum mismatch"));
    }
    if trailer.file_size.get() != size {
        return Err(if size < trailer.file_size.get() {
            truncated(format!(
                "the trailer says {} bytes",
                trailer.file_size.get()
            ))
        } else {
            corrupt(
                path,
                format!(
                    "{size} bytes where the trailer says {}",
                    trailer.file_size.get()
                ),
            )
        });
    }
    Ok(Checked {
        file,
        area_len,
        meta,
        file_size: size,
        claimed_checksum: trailer.file_crc.get(),
        chunk_records: trailer.chunk_records.get(),
        pages: trailer.pages.get(),
    })
}

/// Reads and verifies the whole file; every present run of memory pages goes to `sink`
/// (memory offset, bytes) when given. `progress` gets the memory offset reached.
#[cfg(test)]
fn read(
    path: &Path,
    sink: Option<PageSink<'_>>,
    progress: &mut dyn FnMut(u64),
) -> Result<Contents> {
    read_checked(path, check(path)?, sink, progress)
}

/// Buffers in flight between the reading (and verifying) thread and the sink's thread.
const PIPELINE_BUFFERS: usize = 3;
/// Bytes read by one `read` while a sink is loading (plus room for one chunk record).
const PIPELINE_READ: usize = 8 << 20;

/// [`read`] of a file [`check`] passed. With a sink, the file is read and verified on this
/// thread while a second one hands the pages of the batches already verified to the sink: the
/// read of the file and the writes into the region overlap.
pub(crate) fn read_checked(
    path: &Path,
    checked: Checked,
    sink: Option<PageSink<'_>>,
    progress: &mut dyn FnMut(u64),
) -> Result<Contents> {
    let Some(sink) = sink else {
        let buf = vec![0; BATCH + CHUNK_SIZE as usize];
        return verify(
            path,
            &checked,
            SeqReader::new(&checked.file, path, buf),
            progress,
        );
    };
    std::thread::scope(|scope| {
        let (to_sink, batches) = std::sync::mpsc::sync_channel::<(Vec<u8>, Vec<SinkRun>)>(1);
        let (to_reader, free) = std::sync::mpsc::sync_channel::<Vec<u8>>(PIPELINE_BUFFERS);
        let buffer_len = PIPELINE_READ + CHUNK_SIZE as usize;
        for _ in 1..PIPELINE_BUFFERS {
            to_reader
                .send(vec![0; buffer_len])
                .expect("room for the pool");
        }
        let loader = scope.spawn(move || -> Result<()> {
            for (buf, runs) in batches {
                for run in runs {
                    sink(run.offset, &buf[run.from..run.to])?;
                }
                // The reader may have finished: then nobody needs the buffer back.
                let _ = to_reader.send(buf);
            }
            Ok(())
        });
        let mut reader = SeqReader::new(&checked.file, path, vec![0; buffer_len]);
        reader.handoff = Some(Handoff { to_sink, free });
        let verified = verify(path, &checked, reader, progress);
        let loaded = loader.join().unwrap_or_else(|_| {
            Err(Error::io(
                "loading guest memory",
                std::io::Error::other("the loading thread panicked"),
            ))
        });
        // A failed load stops the reader too (it finds the loader gone): the load's error is
        // the one to name.
        loaded?;
        verified
    })
}

/// Reads the body of a checked file front to back and verifies every record and the final
/// checksum; the reader queues the present pages for its sink, if it has one.
fn verify(
    path: &Path,
    checked: &Checked,
    mut reader: SeqReader<'_>,
    progress: &mut dyn FnMut(u64),
) -> Result<Contents> {
    let size = checked.file_size;
    let meta = checked.meta.clone();
    let area_len = checked.area_len;
    let truncated = |detail: String| problem(path, SwapFileProblem::Truncated { size, detail });
    let body_end = size - TRAILER_LEN as u64;
    reader.size = body_end;
    reader.take(area_len)?.expect("checked above");
    let chunk_count = meta.memory_size.div_ceil(CHUNK_SIZE);
    let (mut next_index, mut records, mut pages) = (0u64, 0u64, 0u64);
    let mut present: Vec<(u64, u64)> = Vec::new();
    let ended = |what: &str| truncated(format!("ends inside {what}"));
    loop {
        match reader.peek_magic()? {
            Some(CHUNK_MAGIC) => {}
            Some(STATE_MAGIC) => break,
            Some(_) => {
                return Err(corrupt(
                    path,
                    format!("unknown record at offset {}", reader.pos),
                ))
            }
            None => return Err(ended("its memory")),
        }
        let header = ChunkHeader::read_from_bytes(
            reader
                .take(CHUNK_HEADER_LEN)?
                .ok_or_else(|| ended("a chunk header"))?,
        )
        .expect("exact size");
        if !trailing_crc_holds(&header) {
            return Err(corrupt(
                path,
                format!("chunk record {records} header checksum mismatch"),
            ));
        }
        let index = header.index.get();
        let chunk_start = index.saturating_mul(CHUNK_SIZE);
        let chunk_pages = meta
            .memory_size
            .saturating_sub(chunk_start)
            .div_ceil(PAGE_SIZE);
        let count = header.page_count.get() as u64;
        let bits: u64 = header.bitmap.iter().map(|b| b.count_ones() as u64).sum();
        let beyond = (chunk_pages.min(CHUNK_PAGES)..CHUNK_PAGES)
            .any(|p| header.bitmap[p as usize / 8] & (1 << (p % 8)) != 0);
        if index < next_index || index >= chunk_count || bits != count || count == 0 || beyond {
            return Err(corrupt(
                path,
                format!("chunk record {records} (chunk {index}) is inconsistent"),
            ));
        }
        let data_len = (count * PAGE_SIZE) as usize;
        let (from, to) = reader
            .take_unsummed(data_len)?
            .ok_or_else(|| ended("a chunk's pages"))?;
        let data_crc = crc32c::crc32c(&reader.buf[from..to]);
        reader.add_sum(data_crc, data_len);
        if data_crc != header.data_crc.get() {
            return Err(problem(
                path,
                SwapFileProblem::ChunkChecksum {
                    chunk: index,
                    offset: chunk_start,
                },
            ));
        }
        // One sink call per run of consecutive present pages.
        let mut at = 0usize;
        let mut page = 0u64;
        while page < CHUNK_PAGES {
            let is_present = |p: u64| header.bitmap[p as usize / 8] & (1 << (p % 8)) != 0;
            if !is_present(page) {
                page += 1;
                continue;
            }
            let run = (page..CHUNK_PAGES).take_while(|p| is_present(*p)).count();
            let len = run * PAGE_SIZE as usize;
            let offset = chunk_start + page * PAGE_SIZE;
            if reader.handoff.is_some() {
                reader.pending.push(SinkRun {
                    offset,
                    from: from + at,
                    to: from + at + len,
                });
            }
            match present.last_mut() {
                Some((start, run_len)) if *start + *run_len == offset => *run_len += len as u64,
                _ => present.push((offset, len as u64)),
            }
            at += len;
            page += run as u64;
        }
        next_index = index + 1;
        records += 1;
        pages += count;
        progress((chunk_start + CHUNK_SIZE).min(meta.memory_size));
    }
    let mut blob = |magic: [u8; 8], what: &str| -> Result<Vec<u8>> {
        let header =
            BlobHeader::read_from_bytes(reader.take(BLOB_HEADER_LEN)?.ok_or_else(|| ended(what))?)
                .expect("exact size");
        if header.magic != magic || !trailing_crc_holds(&header) {
            return Err(corrupt(path, format!("{what} header damaged")));
        }
        let len = usize::try_from(header.len.get())
            .ok()
            .filter(|len| (*len as u64) <= body_end.min(MAX_BLOB_LEN))
            .ok_or_else(|| corrupt(path, format!("{what} length out of range")))?;
        let data = reader.take(padded(len))?.ok_or_else(|| ended(what))?[..len].to_vec();
        if crc32c::crc32c(&data) != header.data_crc.get() {
            return Err(corrupt(path, format!("{what} checksum mismatch")));
        }
        Ok(data)
    };
    let state = blob(STATE_MAGIC, "the state blob")?;
    let config = blob(CONFIG_MAGIC, "the config blob")?;
    if reader.pos != body_end {
        return Err(corrupt(path, "bytes between the config and the trailer"));
    }
    if records != checked.chunk_records || pages != checked.pages {
        return Err(corrupt(
            path,
            "the trailer's counts do not match the chunks",
        ));
    }
    if reader.crc != checked.claimed_checksum {
        return Err(corrupt(path, "final checksum mismatch"));
    }
    reader.hand_off()?;
    progress(meta.memory_size);
    Ok(Contents {
        checksum: reader.crc,
        state,
        config,
        present,
    })
}

/// Reads a whole small file (tests).
#[cfg(test)]
fn slurp(path: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut bytes = Vec::new();
    File::open(path).unwrap().read_to_end(&mut bytes).unwrap();
    bytes
}

#[cfg(test)]
mod tests {
    use std::mem::offset_of;

    use super::*;

    fn meta() -> SwapMeta {
        SwapMeta {
            name: "vm-a".into(),
            vm_uuid: Uuid([1; 16]),
            region_uuid: Uuid([2; 16]),
            region_path: "/nv/region".into(),
            memory_size: 3 * CHUNK_SIZE + 5 * PAGE_SIZE,
            seq: 9,
        }
    }

    /// Memory where page `p` holds `p as u8 + 1` in its first byte when `p % 7 == 0`, zero
    /// elsewhere; only the first two chunks and the tail are "data" ranges.
    fn write_sample(path: &Path) -> Written {
        let meta = meta();
        let mut file = File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .unwrap();
        let mut read = |offset: u64, buf: &mut [u8]| {
            for (i, page) in buf.chunks_mut(PAGE_SIZE as usize).enumerate() {
                let p = offset / PAGE_SIZE + i as u64;
                page.fill(0);
                if p.is_multiple_of(7) {
                    page[0] = p as u8 + 1;
                    page[4095] = 0xa5;
                }
            }
            Ok(())
        };
        let memory = SwapSource {
            data_ranges: vec![(0, 2 * CHUNK_SIZE), (3 * CHUNK_SIZE, meta.memory_size)],
            read: &mut read,
            state: b"state",
            config: b"{\"cfg\":1}",
        };
        write(&mut file, path, &meta, memory, &mut |_| {}, &mut || {}).unwrap()
    }

    #[test]
    fn records_are_pinned_to_their_documented_offsets() {
        assert_eq!(offset_of!(Header, memory_size), 48);
        assert_eq!(offset_of!(Header, strings_crc), 76);
        assert_eq!(offset_of!(ChunkHeader, bitmap), 24);
        assert_eq!(offset_of!(BlobHeader, data_crc), 16);
        assert_eq!(offset_of!(Trailer, file_crc), 32);
    }

    #[test]
    fn a_written_file_reads_back_with_only_its_non_zero_pages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.swap");
        let written = write_sample(&path);
        let bytes = slurp(&path);
        assert_eq!(bytes.len() as u64, written.file_size);
        assert_eq!(&bytes[..8], b"NVHVSWAP");
        assert_eq!(&bytes[8..12], &1u32.to_le_bytes());
        assert_eq!(&bytes[12..16], &4096u32.to_le_bytes());
        assert_eq!(&bytes[128..132], b"vm-a");
        assert_eq!(&bytes[132..142], b"/nv/region");
        assert_eq!(&bytes[4096..4104], b"NVSWCHNK");
        let trailer = &bytes[bytes.len() - TRAILER_LEN..];
        assert_eq!(&trailer[..8], b"NVSWTRLR");
        assert_eq!(
            &trailer[32..36],
            &crc32c::crc32c(&bytes[..bytes.len() - TRAILER_LEN]).to_le_bytes()
        );
        // Pages 0, 7, 14, ... inside the data ranges; chunk 2 is outside them (a hole).
        let total_pages = meta().memory_size / PAGE_SIZE;
        let expected: Vec<u64> = (0..total_pages)
            .filter(|p| p.is_multiple_of(7))
            .filter(|p| !(2 * CHUNK_PAGES..3 * CHUNK_PAGES).contains(p))
            .collect();
        assert_eq!(written.memory_bytes, expected.len() as u64 * PAGE_SIZE);
        let mut seen = Vec::new();
        let mut sink = |offset: u64, data: &[u8]| {
            for (i, page) in data.chunks(PAGE_SIZE as usize).enumerate() {
                let p = offset / PAGE_SIZE + i as u64;
                assert_eq!((page[0], page[4095]), (p as u8 + 1, 0xa5));
                seen.push(p);
            }
            Ok(())
        };
        let contents = read(&path, Some(&mut sink), &mut |_| {}).unwrap();
        assert_eq!(seen, expected);
        assert_eq!(check(&path).unwrap().meta, meta());
        assert_eq!(contents.state, b"state");
        assert_eq!(contents.config, b"{\"cfg\":1}");
        assert_eq!(contents.checksum, written.checksum);
        let summary = inspect(&path).unwrap();
        assert_eq!((summary.vm_name.as_str(), summary.seq), ("vm-a", 9));
    }

    #[test]
    fn a_state_larger_than_a_batch_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big-state.swap");
        let mut file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let state: Vec<u8> = (0..(BATCH + CHUNK_SIZE as usize + 12345))
            .map(|i| (i % 253) as u8)
            .collect();
        let mut no_memory = |_: u64, _: &mut [u8]| -> Result<()> { panic!("no data range") };
        let source = SwapSource {
            data_ranges: Vec::new(),
            read: &mut no_memory,
            state: &state,
            config: b"",
        };
        let written = write(&mut file, &path, &meta(), source, &mut |_| {}, &mut || {}).unwrap();
        assert_eq!(written.memory_bytes, 0);
        let contents = read(&path, None, &mut |_| {}).unwrap();
        assert!(contents.state == state);
        assert_eq!(contents.config, b"");
    }

    #[test]
    fn every_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.swap");
        write_sample(&path);
        let good = slurp(&path);
        let check = |bytes: &[u8]| {
            let damaged = dir.path().join("damaged");
            std::fs::write(&damaged, bytes).unwrap();
            match read(&damaged, None, &mut |_| {}) {
                Err(Error::SwapFile { problem, .. }) => problem,
                other => panic!("{other:?}"),
            }
        };
        let flip = |at: usize| {
            let mut bytes = good.clone();
            bytes[at] ^= 0x10;
            check(&bytes)
        };
        assert!(matches!(
            check(&good[..good.len() - 100]),
            SwapFileProblem::Truncated { .. }
        ));
        assert!(matches!(
            check(&good[..50]),
            SwapFileProblem::Truncated { .. }
        ));
        assert_eq!(flip(0), SwapFileProblem::ForeignMagic);
        assert_eq!(
            flip(50),
            SwapFileProblem::Corrupt("header checksum mismatch".into())
        );
        assert_eq!(
            flip(130),
            SwapFileProblem::Corrupt("VM name or region path checksum mismatch".into())
        );
        assert_eq!(
            flip(4096 + 30),
            SwapFileProblem::Corrupt("chunk record 0 header checksum mismatch".into())
        );
        // The second page of chunk 0's data.
        assert_eq!(
            flip(4096 + CHUNK_HEADER_LEN + 4096 + 3),
            SwapFileProblem::ChunkChecksum {
                chunk: 0,
                offset: 0
            }
        );
        assert_eq!(
            flip(good.len() - TRAILER_LEN + 33),
            SwapFileProblem::Corrupt("trailer checksum mismatch".into())
        );
        // In the config blob's bytes, just before the trailer.
        assert_eq!(
            flip(good.len() - TRAILER_LEN - 10),
            SwapFileProblem::Corrupt("the config blob checksum mismatch".into())
        );
        // A future version with an intact header.
        let mut future = good.clone();
        future[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32c::crc32c(&future[..124]);
        future[124..128].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            check(&future),
            SwapFileProblem::FutureVersion {
                found: 2,
                supported: 1
            }
        );
        assert_eq!(
            check(b"#!/bin/sh\necho hi\n"),
            SwapFileProblem::ForeignMagic
        );
    }
}

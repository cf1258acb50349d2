//! Layer compression: the deterministic gzip (parallel, with block reuse) and zstd encoders
//! between the diff-id hasher and the blob writer, and re-feeding a stored tar stream through
//! them (`entry_starts`, `copy_tar_stream`) so that a recompressed layer comes out byte for byte
//! as a fresh build writes it.
//!
//! What it deliberately is not: a tar writer (see `write`); it sees bytes and entry starts only.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, mpsc};

use layerwright_cache::{BlobWriter, Digest, Sha256Writer, Store};

use super::format::{Compression, GZIP_LEVEL, ZSTD_LEVEL};

/// Bytes handed to the zstd backend (and to an uncompressed blob) at a time. Streaming
/// encoders may choose different block boundaries for different input chunkings, so the
/// encoder always sees whole chunks of this size: the compressed bytes then depend only on the
/// uncompressed stream, never on how upstream writers happened to buffer it.
const COMPRESSION_CHUNK: usize = 128 * 1024;

/// A gzip block ends at the start of an entry that [`cuts_gzip_block`] picks once it holds at
/// least this much, so that block boundaries follow the entries, not their offsets.
pub(super) const GZIP_BLOCK_MIN: usize = 64 * 1024;

/// A gzip block that reaches this size ends there (inside a large file).
pub(super) const GZIP_BLOCK_MAX: usize = 256 * 1024;

/// Whether a gzip block may end where the entry at tar path `path` starts: for one entry in 16,
/// chosen by a hash of the path. Boundaries then depend on the entries around them only, so a
/// file that changes (even in size) changes one block, and the blocks after it are the same
/// bytes as before and can be reused (see [`PreviousBlocks`]).
fn cuts_gzip_block(path: &str) -> bool {
    blake3::hash(path.as_bytes()).as_bytes()[0] & 0x0f == 0
}

/// The compressor between the diff-id hasher and the blob writer (also used to recompress a
/// cached layer, which must come out byte for byte as a fresh build's).
pub(crate) struct Compressor {
    encoder: Encoder,
    pending: Vec<u8>,
}

enum Encoder {
    Gzip(ParallelGzip),
    /// Single-threaded on purpose: zstd's output differs between 0 workers and 1 or more, so
    /// the mode is fixed (the workspace does not enable the `zstdmt` feature).
    Zstd(zstd::stream::write::Encoder<'static, BlobWriter>),
    None(BlobWriter),
}

impl Compressor {
    pub(crate) fn new(compression: Compression, blob_writer: BlobWriter) -> io::Result<Compressor> {
        Compressor::reusing(compression, blob_writer, None)
    }

    /// A compressor that takes gzip blocks it would compute from `previous` when they are there.
    pub(super) fn reusing(
        compression: Compression,
        blob_writer: BlobWriter,
        previous: Option<PreviousBlocks>,
    ) -> io::Result<Compressor> {
        let encoder = match compression {
            Compression::Gzip => Encoder::Gzip(ParallelGzip::new(blob_writer, previous)?),
            Compression::Zstd => Encoder::Zstd(zstd::stream::write::Encoder::new(blob_writer, ZSTD_LEVEL)?),
            Compression::None => Encoder::None(blob_writer),
        };
        Ok(Compressor { encoder, pending: Vec::with_capacity(COMPRESSION_CHUNK) })
    }

    /// The most bytes the pending chunk may hold.
    fn chunk_limit(&self) -> usize {
        match self.encoder {
            Encoder::Gzip(_) => GZIP_BLOCK_MAX,
            Encoder::Zstd(_) | Encoder::None(_) => COMPRESSION_CHUNK,
        }
    }

    /// Called by the layer writer where the entry at tar path `path` starts (before its PAX
    /// header, if any): a gzip block may end here.
    pub(super) fn entry_starts(&mut self, path: &str) -> io::Result<()> {
        if matches!(self.encoder, Encoder::Gzip(_)) && self.pending.len() >= GZIP_BLOCK_MIN && cuts_gzip_block(path) {
            // An entry follows, so this block is not the last.
            self.write_chunk(false)?;
        }
        Ok(())
    }

    /// Hands the pending chunk to the encoder; `last` only for the chunk `finish` writes.
    fn write_chunk(&mut self, last: bool) -> io::Result<()> {
        match &mut self.encoder {
            Encoder::Gzip(encoder) => {
                let chunk = std::mem::replace(&mut self.pending, Vec::with_capacity(GZIP_BLOCK_MAX));
                return encoder.write_block(chunk, last);
            }
            Encoder::Zstd(encoder) => encoder.write_all(&self.pending)?,
            Encoder::None(blob_writer) => blob_writer.write_all(&self.pending)?,
        }
        self.pending.clear();
        Ok(())
    }

    /// Writes what is pending and the compressor's trailer, and returns the blob writer.
    pub(crate) fn finish(self) -> io::Result<BlobWriter> {
        Ok(self.finish_with_blocks()?.0)
    }

    /// [`Compressor::finish`], and for gzip the blocks as written (for [`PreviousBlocks::save`]).
    pub(super) fn finish_with_blocks(mut self) -> io::Result<(BlobWriter, Vec<WrittenBlock>)> {
        self.write_chunk(true)?;
        match self.encoder {
            Encoder::Gzip(encoder) => encoder.finish(),
            Encoder::Zstd(encoder) => Ok((encoder.finish()?, Vec::new())),
            Encoder::None(blob_writer) => Ok((blob_writer, Vec::new())),
        }
    }
}

impl Write for Compressor {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        if buffer.is_empty() {
            return Ok(0);
        }
        // A full chunk is handed on only once more bytes arrive, so that the chunk `finish`
        // writes (the one gzip marks final) is never empty: tar streams are multiples of 512
        // bytes and often end exactly on a chunk boundary.
        let limit = self.chunk_limit();
        if self.pending.len() == limit {
            self.write_chunk(false)?;
        }
        let taken = (limit - self.pending.len()).min(buffer.len());
        self.pending.extend_from_slice(&buffer[..taken]);
        Ok(taken)
    }

    /// Deliberately a no-op: flushing an encoder ends a deflate block early, which would make
    /// the output depend on when callers flush. Everything is written by `finish`.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where the entries of a layer's uncompressed tar `stream` start (their PAX header, if any),
/// with their tar paths as `write_layer` names them: what [`Compressor::entry_starts`] was
/// told when the layer was written. For recompressing a layer as a fresh build would write it.
pub(crate) fn entry_starts(stream: impl Read) -> io::Result<Vec<(u64, String)>> {
    let mut archive = tar::Archive::new(stream);
    let mut starts = Vec::new();
    // Raw: a PAX header is a member of its own, whose position is where its entry starts.
    let mut pax: Option<(u64, Option<String>)> = None;
    for member in archive.entries()?.raw(true) {
        let mut member = member?;
        let position = member.raw_header_position();
        if member.header().entry_type() == tar::EntryType::XHeader {
            let mut records = Vec::new();
            member.read_to_end(&mut records)?;
            let mut path = None;
            for record in tar::PaxExtensions::new(&records) {
                let record = record?;
                if record.key() == Ok("path") {
                    path = Some(String::from_utf8_lossy(record.value_bytes()).into_owned());
                }
            }
            pax = Some((pax.map_or(position, |(start, _)| start), path));
            continue;
        }
        let (start, pax_path) = pax.take().unwrap_or((position, None));
        let path = pax_path.unwrap_or_else(|| String::from_utf8_lossy(&member.path_bytes()).into_owned());
        starts.push((start, path.trim_end_matches('/').to_owned()));
    }
    Ok(starts)
}

/// Copies a layer's uncompressed tar `stream` into `writer` (whose compressor is its inner
/// writer), telling the compressor where each entry of `starts` ([`entry_starts`]) begins.
pub(crate) fn copy_tar_stream(
    mut stream: impl Read,
    writer: &mut Sha256Writer<Compressor>,
    starts: &[(u64, String)],
) -> io::Result<()> {
    let mut buffer = vec![0u8; COMPRESSION_CHUNK];
    let mut position = 0u64;
    let mut next = starts.iter().peekable();
    loop {
        while let Some((start, path)) = next.next_if(|(start, _)| *start <= position) {
            debug_assert_eq!(*start, position, "entries start where the bytes before them end");
            writer.get_mut().entry_starts(path)?;
        }
        // Never read past the next entry start, so that it is told at its exact position.
        let room = next.peek().map_or(buffer.len(), |(start, _)| {
            usize::try_from(start - position).map_or(buffer.len(), |left| left.min(buffer.len()))
        });
        let read = match stream.read(&mut buffer[..room]) {
            Ok(0) => return Ok(()),
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        writer.write_all(&buffer[..read])?;
        position += read as u64;
    }
}

/// The deflate history window: a block's dictionary is this much of the stream before it.
pub(super) const DEFLATE_WINDOW: usize = 32 * 1024;

/// The gzip header of every layer: no file name, mtime 0, no extra flags (neither level 9's nor level 1's), OS byte 255
/// ("unknown"), so nothing of the host leaks in.
pub(super) const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];

/// How many compressed blocks may be pending per layer (bounds memory to a few MiB).
fn gzip_blocks_in_flight() -> usize {
    2 * compression_pool().threads + 2
}

/// What a gzip block's compressed bytes are a function of: its dictionary, its bytes, whether
/// it ends the stream (and the level and scheme, fixed by the key format version).
fn gzip_block_key(dictionary: Option<&[u8]>, block: &[u8], last: bool) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"layerwright gzip block");
    hasher.update(&layerwright_cache::KEY_FORMAT_VERSION.to_le_bytes());
    hasher.update(&[u8::from(last)]);
    let dictionary = dictionary.unwrap_or_default();
    hasher.update(&(dictionary.len() as u64).to_le_bytes());
    hasher.update(dictionary);
    hasher.update(block);
    *hasher.finalize().as_bytes()
}

/// One block of a gzip blob as written: its key, where its compressed bytes are in the blob,
/// and their blake3 (checked before they are reused).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct WrittenBlock {
    pub(super) key: String,
    offset: u64,
    length: u64,
    blake3: String,
}

/// The block map of a gzip layer blob, saved under the layer's shape (see [`layer_shape`]).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct BlockMap {
    pub(super) blob: Digest,
    pub(super) blocks: Vec<WrittenBlock>,
}

/// The gzip blocks of the last layer written with the same entry paths (the same step, most
/// often, after a file changed): a block whose key matches is copied from that blob instead of
/// being compressed again. Only a shortcut: the bytes are checked against the blake3 recorded
/// when they were written, and anything missing or different is simply compressed; the
/// output is the same either way.
pub(super) struct PreviousBlocks {
    blob: File,
    blocks: HashMap<[u8; 32], WrittenBlock>,
}

impl PreviousBlocks {
    fn map_path(store: &Store, shape: &blake3::Hash) -> PathBuf {
        store.root().join("gzip-blocks").join(format!("{}.json", shape.to_hex()))
    }

    pub(super) fn load(store: &Store, shape: &blake3::Hash) -> Option<PreviousBlocks> {
        let bytes = std::fs::read(PreviousBlocks::map_path(store, shape)).ok()?;
        let map: BlockMap = serde_json::from_slice(&bytes).ok()?;
        let blob = store.open_blob(&map.blob).ok()?;
        let mut blocks = HashMap::with_capacity(map.blocks.len());
        for block in map.blocks {
            let mut key = [0u8; 32];
            hex::decode_to_slice(&block.key, &mut key).ok()?;
            blocks.insert(key, block);
        }
        Some(PreviousBlocks { blob, blocks })
    }

    /// The compressed bytes of the block `key`, if the previous blob has them intact.
    fn take(&self, key: &[u8; 32]) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let block = self.blocks.get(key)?;
        let mut bytes = vec![0u8; usize::try_from(block.length).ok()?];
        self.blob.read_exact_at(&mut bytes, block.offset).ok()?;
        (blake3::hash(&bytes).to_hex().as_str() == block.blake3).then_some(bytes)
    }

    /// Records the blocks of `blob` under `shape` for the next layer of that shape. Only an
    /// accelerator: a map that cannot be written is left out.
    pub(super) fn save(store: &Store, shape: &blake3::Hash, blob: &Digest, blocks: Vec<WrittenBlock>) {
        let path = PreviousBlocks::map_path(store, shape);
        let map = BlockMap { blob: blob.clone(), blocks };
        let Ok(bytes) = serde_json::to_vec(&map) else { return };
        if let Some(parent) = path.parent()
            && std::fs::create_dir_all(parent).is_ok()
        {
            let _ = store.write_file_atomically(&path, &bytes);
        }
    }
}

/// Which earlier layer's gzip blocks a layer may reuse: one with the same tar paths in order.
pub(super) fn layer_shape<'a>(tar_paths: impl IntoIterator<Item = &'a str>) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"layerwright layer shape");
    for tar_path in tar_paths {
        hasher.update(&(tar_path.len() as u64).to_le_bytes());
        hasher.update(tar_path.as_bytes());
    }
    hasher.finalize()
}

/// A block on its way into the blob.
enum PendingBlock {
    /// Copied from the previous blob.
    Reused(Vec<u8>),
    Compressing(mpsc::Receiver<io::Result<Vec<u8>>>),
}

/// A gzip writer that compresses blocks of the stream (cut at entries, see
/// [`cuts_gzip_block`]) on several cores and still writes bytes that depend only on the
/// stream, never on the number of threads, the machine or the timing (the scheme of pigz): one
/// gzip member whose deflate stream is the concatenation of the blocks' raw deflate streams,
/// each block compressed by its own zlib-rs compressor at [`GZIP_LEVEL`] primed with the last
/// 32 KiB of the block before it (so matches still reach back across block boundaries) and
/// ended with a sync flush (byte-aligned, not final); the last block ends the stream. The
/// CRC-32 and size trailer cover the whole stream. Every gzip reader reads it as one ordinary
/// member. Since a block's bytes are a function of its key ([`gzip_block_key`]), a block of an
/// earlier blob with the same key is reused as it is ([`PreviousBlocks`]).
struct ParallelGzip {
    blob_writer: BlobWriter,
    crc: flate2::Crc,
    /// The last [`DEFLATE_WINDOW`] bytes of the previous block: the next block's dictionary.
    previous_tail: Option<Arc<[u8]>>,
    /// Blocks not yet written, oldest first, with their keys; written in this order.
    in_flight: VecDeque<([u8; 32], PendingBlock)>,
    previous: Option<PreviousBlocks>,
    /// Bytes written to the blob so far (the header included).
    offset: u64,
    written: Vec<WrittenBlock>,
}

impl ParallelGzip {
    fn new(mut blob_writer: BlobWriter, previous: Option<PreviousBlocks>) -> io::Result<ParallelGzip> {
        blob_writer.write_all(&GZIP_HEADER)?;
        Ok(ParallelGzip {
            blob_writer,
            crc: flate2::Crc::new(),
            previous_tail: None,
            in_flight: VecDeque::new(),
            previous,
            offset: GZIP_HEADER.len() as u64,
            written: Vec::new(),
        })
    }

    /// Compresses one block (or takes it from the previous blob): on the pool, or here for the
    /// last one (this thread has nothing else to do, and a one-block layer then never waits
    /// for another thread).
    fn write_block(&mut self, block: Vec<u8>, last: bool) -> io::Result<()> {
        self.crc.update(&block);
        let tail: Arc<[u8]> = Arc::from(&block[block.len().saturating_sub(DEFLATE_WINDOW)..]);
        let dictionary = self.previous_tail.replace(tail);
        let key = gzip_block_key(dictionary.as_deref(), &block, last);
        let pending = match self.previous.as_ref().and_then(|previous| previous.take(&key)) {
            Some(bytes) => PendingBlock::Reused(bytes),
            None if last => PendingBlock::Reused(deflate_block(&block, dictionary.as_deref(), last)?),
            None => {
                let (sender, receiver) = mpsc::sync_channel(1);
                compression_pool().submit(Box::new(move || {
                    // The receiver is gone only when the layer was abandoned; nothing to report.
                    let _ = sender.send(deflate_block(&block, dictionary.as_deref(), last));
                }));
                PendingBlock::Compressing(receiver)
            }
        };
        self.in_flight.push_back((key, pending));
        let limit = if last { 0 } else { gzip_blocks_in_flight() };
        while self.in_flight.len() > limit {
            self.write_oldest()?;
        }
        Ok(())
    }

    fn write_oldest(&mut self) -> io::Result<()> {
        let Some((key, pending)) = self.in_flight.pop_front() else { return Ok(()) };
        let compressed = match pending {
            PendingBlock::Reused(bytes) => bytes,
            PendingBlock::Compressing(receiver) => {
                receiver.recv().map_err(|_| io::Error::other("a gzip compression thread died"))??
            }
        };
        self.blob_writer.write_all(&compressed)?;
        self.written.push(WrittenBlock {
            key: hex::encode(key),
            offset: self.offset,
            length: compressed.len() as u64,
            blake3: blake3::hash(&compressed).to_hex().to_string(),
        });
        self.offset += compressed.len() as u64;
        Ok(())
    }

    /// Writes the trailer (CRC-32 and size modulo 2^32, little-endian). The last block must
    /// have been written.
    fn finish(mut self) -> io::Result<(BlobWriter, Vec<WrittenBlock>)> {
        debug_assert!(self.in_flight.is_empty(), "the last block drains the blocks before it");
        let mut trailer = [0u8; 8];
        trailer[..4].copy_from_slice(&self.crc.sum().to_le_bytes());
        trailer[4..].copy_from_slice(&self.crc.amount().to_le_bytes());
        self.blob_writer.write_all(&trailer)?;
        Ok((self.blob_writer, self.written))
    }
}

/// One block as raw deflate at [`GZIP_LEVEL`], primed with `dictionary`, ended with a sync
/// flush, or as the final block of the stream when `last`.
pub(super) fn deflate_block(block: &[u8], dictionary: Option<&[u8]>, last: bool) -> io::Result<Vec<u8>> {
    use flate2::{Compress, FlushCompress, Status};
    let mut compress = Compress::new(flate2::Compression::new(GZIP_LEVEL), false);
    if let Some(dictionary) = dictionary {
        compress.set_dictionary(dictionary).map_err(io::Error::other)?;
    }
    let flush = if last { FlushCompress::Finish } else { FlushCompress::Sync };
    // Incompressible input grows by a few bytes per stored block; this is room for it.
    let mut output = Vec::with_capacity(block.len() + block.len() / 64 + 64);
    loop {
        let consumed = usize::try_from(compress.total_in()).expect("a block fits in memory");
        let status = compress.compress_vec(&block[consumed..], &mut output, flush).map_err(io::Error::other)?;
        let input_done = compress.total_in() as usize == block.len();
        // The flush is complete once all input is consumed and the output was not cut short
        // by a full buffer (zlib's contract: call again while avail_out is 0).
        let complete = match status {
            Status::StreamEnd => true,
            _ if last => false,
            _ => input_done && output.len() < output.capacity(),
        };
        if complete {
            return Ok(output);
        }
        output.reserve(output.capacity().max(4096));
    }
}

/// A job for the compression pool.
type CompressionJob = Box<dyn FnOnce() + Send>;

/// The process's compression threads (one per core), shared by every layer being written.
/// Jobs are pure computations that never wait on anything, so any thread may submit and wait
/// for results without risk of deadlock, whichever pool it belongs to.
struct CompressionPool {
    jobs: mpsc::Sender<CompressionJob>,
    threads: usize,
}

impl CompressionPool {
    fn submit(&self, job: CompressionJob) {
        if let Err(mpsc::SendError(job)) = self.jobs.send(job) {
            job(); // No worker is left (they only stop with the process): run it here.
        }
    }
}

fn compression_pool() -> &'static CompressionPool {
    static POOL: OnceLock<CompressionPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(2, usize::from);
        let (sender, receiver) = mpsc::channel::<CompressionJob>();
        let receiver = Arc::new(Mutex::new(receiver));
        let mut started = 0;
        for index in 0..threads {
            let receiver = Arc::clone(&receiver);
            let spawned = std::thread::Builder::new().name(format!("layerwright-gzip-{index}")).spawn(move || {
                loop {
                    let job = receiver.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                }
            });
            started += usize::from(spawned.is_ok());
        }
        // Without any thread, `submit` runs jobs on the caller (the receiver is dropped here).
        CompressionPool { jobs: sender, threads: started.max(1) }
    })
}

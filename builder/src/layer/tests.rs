//! Tests of the layer writer, reader and compressors.

use std::fmt::Write as _;

use std::sync::Arc;

use super::*;
use crate::layer::compress::*;

const PLAIN: LayerOptions = LayerOptions { compression: Compression::None, mtime: 0 };

fn new_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    (dir, store)
}

fn entry(path: &str, kind: EntryKind, mode: u32) -> LayerEntry {
    LayerEntry { path: path.to_owned(), kind, mode, uid: 0, gid: 0, xattrs: Vec::new() }
}

fn file(path: &str, content: &[u8], mode: u32) -> LayerEntry {
    let kind = EntryKind::File { content: Content::Inline(Arc::from(content)), size: content.len() as u64 };
    entry(path, kind, mode)
}

fn dir(path: &str) -> LayerEntry {
    entry(path, EntryKind::Directory, 0o755)
}

fn owned(mut entry: LayerEntry, uid: u32, gid: u32) -> LayerEntry {
    entry.uid = uid;
    entry.gid = gid;
    entry
}

/// The uncompressed tar of a written layer.
fn layer_tar(store: &Store, record: &LayerRecord) -> Vec<u8> {
    let blob = std::fs::read(store.blob_path(&record.digest)).unwrap();
    match Compression::from_media_type(&record.media_type).unwrap() {
        Compression::Gzip => {
            let mut tar = Vec::new();
            flate2::read::GzDecoder::new(&blob[..]).read_to_end(&mut tar).unwrap();
            tar
        }
        Compression::Zstd => zstd::stream::decode_all(&blob[..]).unwrap(),
        Compression::None => blob,
    }
}

/// One line per tar member as the tar crate reads it (PAX applied):
/// `TYPE MODE UID:GID SIZE MTIME PATH [-> LINK] [CONTENT] [pax KEYS]`. Also asserts that
/// uname and gname are empty.
fn describe_tar(tar: &[u8]) -> String {
    let mut text = String::new();
    let mut archive = tar::Archive::new(tar);
    for member in archive.entries().unwrap() {
        let mut member = member.unwrap();
        let header = member.header().clone();
        assert_eq!(header.username_bytes(), Some(&b""[..]));
        assert_eq!(header.groupname_bytes(), Some(&b""[..]));
        let path = String::from_utf8(member.path_bytes().into_owned()).unwrap();
        let link =
            member.link_name_bytes().map(|link| format!(" -> {}", String::from_utf8_lossy(&link))).unwrap_or_default();
        let pax_keys: Vec<String> = match member.pax_extensions().unwrap() {
            Some(extensions) => extensions
                .map(|extension| {
                    let extension = extension.unwrap();
                    let key = extension.key().unwrap().to_owned();
                    if key.starts_with("SCHILY.xattr.") {
                        format!("{key}={}", String::from_utf8_lossy(extension.value_bytes()))
                    } else {
                        key
                    }
                })
                .collect(),
            None => Vec::new(),
        };
        let mut content = Vec::new();
        member.read_to_end(&mut content).unwrap();
        let _ = write!(
            text,
            "{:?} {:04o} {}:{} {} {} {}{}",
            header.entry_type(),
            header.mode().unwrap(),
            header.uid().unwrap(),
            header.gid().unwrap(),
            member.size(),
            header.mtime().unwrap(),
            path,
            link,
        );
        if !content.is_empty() {
            let _ = write!(text, " {:?}", String::from_utf8_lossy(&content));
        }
        if !pax_keys.is_empty() {
            let _ = write!(text, " pax[{}]", pax_keys.join(","));
        }
        text.push('\n');
    }
    text
}

/// Writes `entries` uncompressed and compares the tar, as read back, with `expected`.
fn check_tar(entries: Vec<LayerEntry>, options: &LayerOptions, expected: &str) {
    let (_dir, store) = new_store();
    let written = write_layer(&store, entries, options).unwrap();
    let described = describe_tar(&layer_tar(&store, &written.record));
    assert_eq!(described, expected, "\n{described}");
}

#[test]
fn entries_are_sorted_component_wise_and_output_is_reproducible() {
    let entries = vec![
        file("z", b"z", 0o644),
        file("a-b", b"dash", 0o644),
        dir("a"),
        entry("a/l", EntryKind::Symlink { target: "../z".into() }, 0o777),
        file("a/c/d", b"deep", 0o644),
        dir("a/c"),
        file("a/b", b"b", 0o644),
    ];
    let orders = [
        entries.clone(),
        entries.iter().rev().cloned().collect(),
        entries.iter().skip(3).chain(entries.iter().take(3)).cloned().collect::<Vec<_>>(),
    ];
    for compression in [Compression::Gzip, Compression::Zstd, Compression::None] {
        let options = LayerOptions { compression, mtime: 1_700_000_000 };
        let mut outputs = Vec::new();
        for order in &orders {
            // A fresh store each time, so every blob is really written again.
            let (_dir, store) = new_store();
            let written = write_layer(&store, order.clone(), &options).unwrap();
            let blob = std::fs::read(store.blob_path(&written.record.digest)).unwrap();
            outputs.push((written.record, blob, written.index));
        }
        for output in &outputs[1..] {
            assert_eq!(output, &outputs[0], "{compression:?}");
        }
    }
    check_tar(
        entries,
        &PLAIN,
        "\
Directory 0755 0:0 0 0 a/
Regular 0644 0:0 1 0 a/b \"b\"
Directory 0755 0:0 0 0 a/c/
Regular 0644 0:0 4 0 a/c/d \"deep\"
Symlink 0777 0:0 0 0 a/l -> ../z
Regular 0644 0:0 4 0 a-b \"dash\"
Regular 0644 0:0 1 0 z \"z\"
",
    );
}

#[test]
fn headers_carry_modes_owners_devices_and_xattrs_exactly() {
    let mut with_xattr = file("bin/ping", b"", 0o755);
    with_xattr.xattrs = vec![("security.capability".into(), b"cap".to_vec()), ("user.a".into(), b"1".to_vec())];
    check_tar(
        vec![
            owned(file("usr/bin/su", b"su", 0o4755), 0, 0),
            owned(file("etc/shadow", b"x", 0o600), 0, 42),
            owned(entry("srv", EntryKind::Directory, 0o2775), 1000, 1000),
            with_xattr,
            owned(file("home/big", b"", 0o644), 3_000_000, 70_000),
            entry("tmp", EntryKind::Directory, 0o1777),
            entry("dev/null", EntryKind::CharDevice { major: 1, minor: 3 }, 0o666),
            entry("dev/sda", EntryKind::BlockDevice { major: 8, minor: 0 }, 0o660),
            entry("run/pipe", EntryKind::Fifo, 0o644),
            // File-type bits in a caller's mode are dropped.
            entry("x", EntryKind::Directory, 0o040_700),
        ],
        &LayerOptions { compression: Compression::None, mtime: 1_234_567 },
        "\
Regular 0755 0:0 0 1234567 bin/ping pax[SCHILY.xattr.security.capability=cap,SCHILY.xattr.user.a=1]
Char 0666 0:0 0 1234567 dev/null
Block 0660 0:0 0 1234567 dev/sda
Regular 0600 0:42 1 1234567 etc/shadow \"x\"
Regular 0644 3000000:70000 0 1234567 home/big pax[uid]
Fifo 0644 0:0 0 1234567 run/pipe
Directory 2775 1000:1000 0 1234567 srv/
Directory 1777 0:0 0 1234567 tmp/
Regular 4755 0:0 2 1234567 usr/bin/su \"su\"
Directory 0700 0:0 0 1234567 x/
",
    );

    // Device numbers are in the header.
    let (_dir, store) = new_store();
    let written =
        write_layer(&store, vec![entry("dev/null", EntryKind::CharDevice { major: 1, minor: 3 }, 0o666)], &PLAIN)
            .unwrap();
    let tar = layer_tar(&store, &written.record);
    let header = tar::Header::from_byte_slice(&tar[..512]);
    assert_eq!(header.device_major().unwrap(), Some(1));
    assert_eq!(header.device_minor().unwrap(), Some(3));
}

#[test]
fn long_names_whiteouts_and_hard_links_get_their_tar_names() {
    let splittable = format!("{}/{}", "d".repeat(60), "e".repeat(89));
    let one_long_component = "f".repeat(120);
    let too_deep = format!("{}/{}", "g".repeat(160), "h".repeat(50));
    let long_target = "t/".repeat(60);
    assert_eq!(splittable.len(), 150);
    check_tar(
        vec![
            file(&splittable, b"1", 0o644),
            file(&one_long_component, b"2", 0o644),
            file(&too_deep, b"3", 0o644),
            entry("link", EntryKind::Symlink { target: long_target.clone() }, 0o777),
            owned(entry("dir/gone", EntryKind::Whiteout, 0o644), 5, 5),
            entry("dir", EntryKind::OpaqueWhiteout, 0o755),
            entry("", EntryKind::OpaqueWhiteout, 0o755),
            // The target sorts after the link: the link gets the content.
            file("b/target", b"shared", 0o640),
            entry("a/link", EntryKind::HardLink { target: "b/target".into() }, 0o644),
            // A target in a lower layer is written as given.
            entry("c/lower", EntryKind::HardLink { target: "usr/lib/x".into() }, 0o644),
        ],
        &PLAIN,
        &format!(
            "\
Regular 0000 0:0 0 0 .wh..wh..opq
Regular 0640 0:0 6 0 a/link \"shared\"
Link 0640 0:0 0 0 b/target -> a/link
Link 0644 0:0 0 0 c/lower -> usr/lib/x
Regular 0644 0:0 1 0 {splittable} \"1\"
Regular 0000 0:0 0 0 dir/.wh..wh..opq
Regular 0000 0:0 0 0 dir/.wh.gone
Regular 0644 0:0 1 0 {one_long_component} \"2\" pax[path]
Regular 0644 0:0 1 0 {too_deep} \"3\" pax[path]
Symlink 0777 0:0 0 0 link -> {long_target} pax[linkpath]
"
        ),
    );

    // The 150-byte path fits the ustar prefix and name fields, with no PAX header.
    let (_dir, store) = new_store();
    let written = write_layer(&store, vec![file(&splittable, b"1", 0o644)], &PLAIN).unwrap();
    let tar = layer_tar(&store, &written.record);
    let header = tar::Header::from_byte_slice(&tar[..512]);
    let ustar = header.as_ustar().unwrap();
    assert_eq!(header.entry_type(), tar::EntryType::Regular);
    assert_eq!(&ustar.prefix[..61], format!("{}\0", "d".repeat(60)).as_bytes());
    assert_eq!(&ustar.name[..89], "e".repeat(89).as_bytes());
}

#[test]
fn sizes_of_8_gib_and_more_go_through_pax() {
    let huge = 9 * 1024 * 1024 * 1024_u64;
    let planned = PlannedEntry {
        tar_path: "huge".into(),
        image_path: "huge".into(),
        kind: EntryKind::File { content: Content::Inline(Arc::from(&b""[..])), size: huge },
        mode: 0o644,
        uid: 0,
        gid: 0,
        xattrs: Vec::new(),
    };
    let (pax, header) = entry_headers(&planned, 0);
    assert_eq!(pax.bytes, b"19 size=9663676416\n");
    assert_eq!(header.size().unwrap(), huge);

    let small = PlannedEntry {
        kind: EntryKind::File { content: Content::Inline(Arc::from(&b""[..])), size: USTAR_MAX_SIZE },
        ..planned
    };
    assert!(entry_headers(&small, 0).0.is_empty());
}

#[test]
fn header_copies_of_long_paths_keep_whole_components() {
    fn check(path: &str, limit: usize, expected: &str) {
        assert_eq!(truncate_path(path, limit), expected, "{path:?}");
    }
    check("short", 10, "short");
    check("abc/..def/ghi", 7, "abc");
    check("abc/..def/ghi", 10, "abc/..def");
    check("abcdefghijkl", 5, "abcde");
    // Multi-byte characters around the limit: never cut inside one.
    check("\u{e9}\u{e9}\u{e9}/x", 2, "\u{e9}");
    check("\u{e9}\u{e9}\u{e9}", 3, "\u{e9}");
    check("ab/\u{e9}\u{e9}", 4, "ab");
    let long = format!("{}/{}", "\u{e9}".repeat(60), "x".repeat(60));
    assert!(truncate_path(&long, 100).len() <= 100);
}

#[test]
fn pax_record_lengths_count_themselves() {
    for value_length in 0..1100 {
        let mut records = PaxRecords::default();
        records.add("path", "a".repeat(value_length).as_bytes());
        let text = String::from_utf8(records.bytes).unwrap();
        let (length, _) = text.split_once(' ').unwrap();
        assert_eq!(length.parse::<usize>().unwrap(), text.len(), "{text:?}");
    }
}

#[test]
fn compressed_blobs_are_pinned_and_decompress_to_the_diff_id() {
    fn check(compression: Compression, magic: &[u8]) {
        let (_dir, store) = new_store();
        let options = LayerOptions { compression, mtime: 0 };
        let written = write_layer(&store, vec![file("hello", b"hello", 0o644)], &options).unwrap();
        let record = &written.record;
        let blob = std::fs::read(store.blob_path(&record.digest)).unwrap();
        assert!(blob.starts_with(magic), "{compression:?}: {:x?}", &blob[..8]);
        assert_eq!(Digest::of_bytes(&blob), record.digest);
        assert_eq!(blob.len() as u64, record.size);
        assert_eq!(written.blob_bytes_written, record.size);
        assert_eq!(record.media_type, compression.media_type());
        let tar = layer_tar(&store, record);
        assert_eq!(Digest::of_bytes(&tar), record.diff_id);
        assert_eq!(tar.len(), 512 + 512 + 1024, "header, one data block, end blocks");
        if compression == Compression::Gzip {
            assert_eq!(blob[3], 0, "no gzip flags: no file name, no comment");
            assert_eq!(&blob[4..8], &[0, 0, 0, 0], "gzip mtime is 0");
            assert_eq!(blob[9], 255, "gzip OS byte is 'unknown'");
        }
    }
    check(Compression::Gzip, &[0x1f, 0x8b, 8]);
    check(Compression::Zstd, &[0x28, 0xb5, 0x2f, 0xfd]);
    check(Compression::None, b"hello\0");
}

#[test]
fn gzip_blocks_compress_in_parallel_into_one_ordinary_member() {
    // Several blocks mixing text and noise; an exact multiple of the block size (the final
    // block is then a full one); and a single short block.
    let mut mixed = Vec::new();
    for round in 0..6u64 {
        mixed.extend(crate::host::incompressible_bytes(50_000, round + 1));
        mixed.extend(format!("line {round}\n").repeat(4_000).as_bytes());
    }
    let exact = crate::host::incompressible_bytes(3 * GZIP_BLOCK_MAX, 9);
    for data in [mixed, exact, b"short".to_vec()] {
        let (_dir, store) = new_store();
        let mut compressor = Compressor::new(Compression::Gzip, store.blob_writer().unwrap()).unwrap();
        // Odd write sizes: the output must depend on the bytes only.
        for piece in data.chunks(7_777) {
            compressor.write_all(piece).unwrap();
        }
        let blob = compressor.finish().unwrap().commit().unwrap();
        let bytes = std::fs::read(&blob.path).unwrap();

        // One member: a reader that stops after the first member still gets everything.
        let mut decoded = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..]).read_to_end(&mut decoded).unwrap();
        assert_eq!(decoded, data);

        // The same bytes as compressing the blocks one after another on one thread.
        // Without entries, blocks end at the largest block size.
        let blocks: Vec<&[u8]> = data.chunks(GZIP_BLOCK_MAX).collect();
        let mut expected = GZIP_HEADER.to_vec();
        for (position, block) in blocks.iter().enumerate() {
            let dictionary = position.checked_sub(1).map(|previous| {
                let previous = blocks[previous];
                &previous[previous.len() - DEFLATE_WINDOW..]
            });
            expected.extend(deflate_block(block, dictionary, position + 1 == blocks.len()).unwrap());
        }
        let mut crc = flate2::Crc::new();
        crc.update(&data);
        expected.extend(crc.sum().to_le_bytes());
        expected.extend((data.len() as u32).to_le_bytes());
        assert!(bytes == expected, "{} bytes", data.len());
    }
}

#[test]
fn gzip_blocks_follow_entries_and_are_reused_after_a_change() {
    let files = |changed: &[u8]| -> Vec<LayerEntry> {
        (0..300u64)
            .map(|index| {
                let content =
                    if index == 150 { changed.to_vec() } else { crate::host::incompressible_bytes(4096, index + 1) };
                file(&format!("data/f{index:03}"), &content, 0o644)
            })
            .collect()
    };
    let options = LayerOptions { compression: Compression::Gzip, mtime: 0 };
    let block_keys = |store: &Store| -> Vec<String> {
        let maps: Vec<_> = std::fs::read_dir(store.root().join("gzip-blocks")).unwrap().collect();
        assert_eq!(maps.len(), 1, "one map per layer shape");
        let map: BlockMap = serde_json::from_slice(&std::fs::read(maps[0].as_ref().unwrap().path()).unwrap()).unwrap();
        map.blocks.into_iter().map(|block| block.key).collect()
    };

    let (_dir, store) = new_store();
    write_layer(&store, files(&crate::host::incompressible_bytes(4096, 151)), &options).unwrap();
    let before = block_keys(&store);
    // The changed file shrinks: everything after it moves.
    let second = write_layer(&store, files(b"changed"), &options).unwrap();
    let after = block_keys(&store);
    assert!(after.len() >= 8, "{} blocks", after.len());
    let shared = after.iter().filter(|key| before.contains(key)).count();
    assert!(shared + 2 >= after.len(), "only the changed block and the next differ: {shared} of {}", after.len());

    // Reused or not, the bytes are those of a fresh build; a corrupt previous blob is not reused.
    let (_fresh_dir, fresh) = new_store();
    let fresh_second = write_layer(&fresh, files(b"changed"), &options).unwrap();
    assert_eq!(second.record, fresh_second.record);
    let blob_path = store.blob_path(&second.record.digest);
    let mut corrupted = std::fs::read(&blob_path).unwrap();
    corrupted[100] ^= 1;
    std::fs::write(&blob_path, corrupted).unwrap();
    let third = write_layer(&store, files(b"changed"), &options).unwrap();
    assert_eq!(third.record, fresh_second.record, "the corrupt block is compressed again");
}

#[test]
fn sources_must_hold_their_declared_size() {
    fn check(actual_content: &[u8], declared: u64, expected: Option<(u64, u64)>) {
        let (dir, store) = new_store();
        let host_file = dir.path().join("source");
        std::fs::write(&host_file, actual_content).unwrap();
        let kind = EntryKind::File { content: Content::HostFile(host_file), size: declared };
        let result = write_layer(&store, vec![entry("app/data", kind, 0o644)], &PLAIN);
        match (result, expected) {
            (Ok(written), None) => {
                let tar = layer_tar(&store, &written.record);
                assert!(describe_tar(&tar).contains("app/data"));
            }
            (Err(LayerError::SizeChanged { path, expected, actual }), Some(sizes)) => {
                assert_eq!((expected, actual), sizes);
                assert!(path.contains("/app/data"), "{path}");
                let leftovers = std::fs::read_dir(store.tmp_dir()).unwrap().count();
                assert_eq!(leftovers, 0, "the temporary blob is deleted");
            }
            (other, expected) => panic!("{other:?}, expected {expected:?}"),
        }
    }
    check(b"12345", 5, None);
    check(b"12345", 10, Some((10, 5)));
    check(b"12345", 3, Some((3, 5)));
    check(b"", 1, Some((1, 0)));

    let (dir, store) = new_store();
    let kind = EntryKind::File { content: Content::HostFile(dir.path().join("missing")), size: 1 };
    let error = write_layer(&store, vec![entry("x", kind, 0o644)], &PLAIN).unwrap_err();
    assert!(matches!(error, LayerError::ReadSource { .. }), "{error}");
}

#[test]
fn context_files_are_read_through_the_capability() {
    let (dir, store) = new_store();
    let context = dir.path().join("context");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(context.join("inside.txt"), b"inside").unwrap();
    std::fs::write(dir.path().join("outside.txt"), b"secret").unwrap();
    let capability = Arc::new(cap_std::fs::Dir::open_ambient_dir(&context, cap_std::ambient_authority()).unwrap());
    let from_context = |path: &str, size| {
        let kind =
            EntryKind::File { content: Content::Context { dir: capability.clone(), path: path.to_owned() }, size };
        entry("app/file", kind, 0o644)
    };

    let written = write_layer(&store, vec![from_context("inside.txt", 6)], &PLAIN).unwrap();
    let tar = layer_tar(&store, &written.record);
    assert_eq!(describe_tar(&tar), "Regular 0644 0:0 6 0 app/file \"inside\"\n");

    let error = write_layer(&store, vec![from_context("../outside.txt", 6)], &PLAIN).unwrap_err();
    assert!(matches!(error, LayerError::ReadSource { .. }), "{error}");
}

#[test]
fn the_index_lists_the_tar_and_is_saved() {
    let (_dir, store) = new_store();
    let written = write_layer(
        &store,
        vec![
            file("etc/passwd", b"root", 0o644),
            dir("etc"),
            entry("etc/old", EntryKind::Whiteout, 0o644),
            entry("var", EntryKind::OpaqueWhiteout, 0o755),
            entry("etc/link", EntryKind::HardLink { target: "etc/passwd".into() }, 0o644),
        ],
        &PLAIN,
    )
    .unwrap();
    let index_entry = |path: &str, kind, mode| IndexEntry { path: path.to_owned(), kind, mode, uid: 0, gid: 0 };
    let expected = LayerIndex {
        entries: vec![
            index_entry("etc", IndexKind::Directory, 0o755),
            index_entry("etc/old", IndexKind::Whiteout, 0),
            // `etc/link` sorts before `etc/passwd`, so it carries the content.
            index_entry("etc/link", IndexKind::File { size: 4, sha256: Digest::of_bytes(b"root") }, 0o644),
            index_entry("etc/passwd", IndexKind::HardLink { target: "etc/link".into() }, 0o644),
            index_entry("var", IndexKind::OpaqueWhiteout, 0),
        ],
    };
    assert_eq!(written.index, expected);
    let loaded = LayerIndex::load(&store, &written.record.diff_id).unwrap();
    assert_eq!(loaded, Some(expected));
}

#[test]
fn invalid_entries_are_refused() {
    fn check(entries: Vec<LayerEntry>, expected: &str) {
        let (_dir, store) = new_store();
        let error = write_layer(&store, entries, &PLAIN).unwrap_err();
        let text = error.to_string();
        assert!(text.contains(expected), "{text:?} does not contain {expected:?}");
    }
    check(vec![file("a", b"1", 0o644), file("a", b"2", 0o644)], "layer entry a appears twice");
    for bad in ["/abs", "a/../b", "a//b", "a/", ".", "", "a/\0"] {
        check(vec![file(bad, b"", 0o644)], "invalid layer entry");
    }
    check(vec![file("a/.wh.b", b"", 0o644)], "reserved for whiteouts");
    check(vec![file("a", b"", 0o644), file("a/b", b"", 0o644)], "its parent \"a\" is not a directory");
    check(
        vec![entry("l", EntryKind::Symlink { target: "/etc".into() }, 0o777), file("l/passwd", b"", 0o644)],
        "its parent \"l\" is not a directory",
    );
    check(vec![dir("d"), entry("l", EntryKind::HardLink { target: "d".into() }, 0o644)], "hard link to the directory");
    check(
        vec![
            entry("x", EntryKind::HardLink { target: "y".into() }, 0o644),
            entry("y", EntryKind::HardLink { target: "x".into() }, 0o644),
        ],
        "cycle",
    );
    check(vec![entry("x", EntryKind::HardLink { target: "../y".into() }, 0o644)], "hard link target");
    let mut bad_xattr = file("x", b"", 0o644);
    bad_xattr.xattrs = vec![("a=b".into(), Vec::new())];
    check(vec![bad_xattr], "cannot be a PAX key");
}

/// The special entries a RUN step's upper directory can hold, plus the header extensions, as
/// three independent readers see them: this crate's indexer, GNU tar and Python's tarfile.
/// (Sparse files are not written as sparse members: a layer stores their bytes.)
#[test]
fn every_entry_type_round_trips_through_three_readers() {
    let long_name = format!("d/{}/{}", "n".repeat(120), "f".repeat(90));
    let long_target = format!("/{}", "t".repeat(150));
    let mut xattr_file = file("d/cap", b"binary", 0o755);
    // A valid v2 file capability (cap_net_bind_service, effective): the kernel checks it.
    let capability = vec![1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    xattr_file.xattrs.push(("security.capability".into(), capability));
    let entries = vec![
        dir("d"),
        entry("d/fifo", EntryKind::Fifo, 0o644),
        entry("d/null", EntryKind::CharDevice { major: 1, minor: 3 }, 0o666),
        entry("d/loop", EntryKind::BlockDevice { major: 7, minor: 0 }, 0o660),
        file("d/a-target", b"same inode", 0o640),
        entry("d/link", EntryKind::HardLink { target: "d/a-target".into() }, 0o640),
        entry("d/sym", EntryKind::Symlink { target: long_target.clone() }, 0o777),
        file(&long_name, b"long", 0o600),
        owned(file("d/big-ids", b"ids", 0o644), 3_000_000, 4_000_000),
        xattr_file,
    ];
    let (_dir, store) = new_store();
    let options = LayerOptions { compression: Compression::None, mtime: 0 };
    let written = write_layer(&store, entries, &options).unwrap();

    // This crate's reader.
    let index = crate::layer::index_layer(&store, &written.record).unwrap();
    let kind_of = |path: &str| index.entries.iter().find(|entry| entry.path == path).map(|entry| entry.kind.clone());
    assert_eq!(kind_of("d/fifo"), Some(IndexKind::Fifo));
    assert_eq!(kind_of("d/null"), Some(IndexKind::CharDevice { major: 1, minor: 3 }));
    assert_eq!(kind_of("d/loop"), Some(IndexKind::BlockDevice { major: 7, minor: 0 }));
    assert_eq!(kind_of("d/link"), Some(IndexKind::HardLink { target: "d/a-target".into() }));
    assert_eq!(kind_of("d/sym"), Some(IndexKind::Symlink { target: long_target.clone() }));
    assert!(matches!(kind_of(&long_name), Some(IndexKind::File { size: 4, .. })));
    let big = index.entries.iter().find(|entry| entry.path == "d/big-ids").unwrap();
    assert_eq!((big.uid, big.gid), (3_000_000, 4_000_000));
    // The snapshot unpacker (what the next RUN step stacks) reads the device fields of every
    // special file, a FIFO's included.
    let snapshot = crate::layer::snapshot::ensure_snapshot(&store, &written.record, crate::layer::snapshot::flavour());
    let snapshot = snapshot.expect("the layer unpacks into a snapshot");
    let fifo = std::fs::symlink_metadata(snapshot.join("d/fifo")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&fifo.file_type()));

    let tar_path = store.blob_path(&written.record.digest);
    // GNU tar: `-tv` lists type, mode, owner, devices and link targets.
    let listing = std::process::Command::new("tar")
        .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-tvf"])
        .arg(&tar_path)
        .output()
        .expect("GNU tar runs");
    assert!(listing.status.success(), "tar: {}", String::from_utf8_lossy(&listing.stderr));
    // Columns are padded: compare with single spaces.
    let listing: String = String::from_utf8(listing.stdout)
        .unwrap()
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" ") + "\n")
        .collect();
    for expected in [
        "-rwxr-xr-x* 0/0 6", // `*`: the file has xattrs
        "prw-r--r-- 0/0",
        "crw-rw-rw- 0/0",
        "1,3",
        "brw-rw---- 0/0",
        "7,0",
        "d/link link to d/a-target",
        &format!("d/sym -> {long_target}"),
        &long_name,
        "3000000/4000000",
    ] {
        assert!(listing.contains(expected), "GNU tar's listing lacks {expected:?}:\n{listing}");
    }

    // Python's tarfile, with the xattr PAX record.
    let script = r#"
import sys, tarfile
with tarfile.open(sys.argv[1]) as archive:
    for member in archive.getmembers():
        xattr = member.pax_headers.get("SCHILY.xattr.security.capability")
        print(member.name, member.type.decode(), oct(member.mode), member.uid, member.gid,
              member.devmajor, member.devminor, member.linkname, len(xattr) if xattr else "-")
"#;
    let python = std::process::Command::new("python3").arg("-c").arg(script).arg(&tar_path).output();
    let python = python.expect("python3 runs");
    assert!(python.status.success(), "tarfile: {}", String::from_utf8_lossy(&python.stderr));
    let members = String::from_utf8(python.stdout).unwrap();
    for expected in [
        "d/fifo 6 0o644 0 0 0 0  -",
        "d/null 3 0o666 0 0 1 3  -",
        "d/loop 4 0o660 0 0 7 0  -",
        "d/link 1 0o640 0 0 0 0 d/a-target -",
        &format!("d/sym 2 0o777 0 0 0 0 {long_target} -"),
        &format!("{long_name} 0 0o600"),
        "d/big-ids 0 0o644 3000000 4000000",
        "d/cap 0 0o755 0 0 0 0  20",
    ] {
        assert!(members.contains(expected), "tarfile's members lack {expected:?}:\n{members}");
    }
}

//! The record files of the disk store, one call of the file system at a
//! time: reading a record, writing one into place (its spare, then a swap),
//! deleting one with its spare, and finding the expired ones for the
//! sweep. Everything here blocks its thread; [`super::DiskStore`] decides
//! which thread that is, and holds the handle's stripe around each call.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::super::{Expiry, Handle, Record, StoreError};

/// A temporary file not written for this long belongs to no write in
/// progress (a spare the sweep removes too early is made again).
const STALE_TEMP_AGE: Duration = Duration::from_secs(60);

/// Where a write may put its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Place {
    /// In place of the record, or as a new one.
    Anyway,
    /// Only in place of a record still on disk.
    OverRecord,
}

pub(super) fn create_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// The record in `path`; `None` if there is no such file. Anything but a
/// regular file of at most `limit` bytes is a corrupt record: a symbolic
/// link, a FIFO (which would block the thread), a huge file (which would
/// be read whole).
pub(super) fn read_record(
    path: &Path,
    short: &str,
    limit: usize,
) -> Result<Option<Record>, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        handle: short.to_owned(),
        detail,
    };
    let unreadable = |error: io::Error| match error.kind() {
        io::ErrorKind::NotFound => Ok(None),
        _ if is_not_a_record_file(&error) => Err(corrupt(error.to_string())),
        _ => Err(StoreError::Unavailable(format!(
            "cannot read session {short} in {}: {error}",
            crate::config::directory_of(path).display()
        ))),
    };
    let bytes = match read_small_file(path, limit) {
        Ok(bytes) => bytes,
        Err(error) => return unreadable(error),
    };
    let parsed = match serde_json::from_slice(&bytes) {
        // Cut short (see `read_small_file`): the long way, once.
        Err(error) if error.classify() == serde_json::error::Category::Eof => {
            match read_whole_file(path, limit) {
                Ok(bytes) => serde_json::from_slice(&bytes),
                Err(error) => return unreadable(error),
            }
        }
        parsed => parsed,
    };
    parsed.map(Some).map_err(|error| {
        // Where, not what: serde's message may quote session data.
        corrupt(format!(
            "{:?} error at line {} column {}",
            error.classify(),
            error.line(),
            error.column()
        ))
    })
}

/// The whole file at `path`, in as few system calls as a small file
/// allows: open, one read, close. (`fs::read` and `File::read_to_end` add
/// an `fstat` and an `lseek` for the size, and a read that returns 0; a
/// write reads two records.) A read that comes back short of the buffer
/// has reached the end of a regular file on Linux's local file systems;
/// where it has not, the record does not parse as a whole, and
/// [`read_record`] reads it again the long way.
pub(super) fn read_small_file(path: &Path, limit: usize) -> io::Result<Vec<u8>> {
    let mut file = open_record_file(path)?;
    let mut bytes = vec![0; 2048];
    let mut filled = 0;
    loop {
        match file.read(&mut bytes[filled..]) {
            Ok(0) => break,
            Ok(read) => {
                filled += read;
                if filled < bytes.len() {
                    break;
                }
                if filled > limit {
                    return Err(too_large(limit));
                }
                bytes.resize(bytes.len() * 2, 0);
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    bytes.truncate(filled);
    Ok(bytes)
}

/// The whole file at `path`, read to its end: a regular file of at most
/// `limit` bytes.
fn read_whole_file(path: &Path, limit: usize) -> io::Result<Vec<u8>> {
    let file = open_record_file(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    let mut bytes = Vec::new();
    // Saturating: `max_data_bytes` as large as TOML allows makes `limit`
    // `usize::MAX`, where `+ 1` overflowed: a panic in a debug build, and in
    // a release one a bound of 0, which read any record that comes here as
    // empty, so corrupt.
    file.take((limit as u64).saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() > limit {
        return Err(too_large(limit));
    }
    Ok(bytes)
}

/// Opens a record file to read it. Not through a symbolic link, which the
/// store never makes; and without blocking, should the name be a FIFO's.
fn open_record_file(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(
        &mut options,
        libc::O_NOFOLLOW | libc::O_NONBLOCK,
    );
    options.open(path)
}

fn too_large(limit: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("larger than {limit} bytes"),
    )
}

/// The errors of a name in the directory that holds no record the store
/// wrote: what `open_record_file` refuses, and what the readers above do.
fn is_not_a_record_file(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::InvalidData | io::ErrorKind::WouldBlock
    ) || error.raw_os_error() == Some(libc::ELOOP)
}

/// Writes `json` as the record of `handle`: into its spare file, which
/// then takes the record's place (see [`put_in_place`]).
///
/// The spare, `.HANDLE.tmp`, is the file the previous write swapped out:
/// the record's version before last, overwritten in place by the next
/// write. Reusing it spares the file system an inode created and one
/// deleted per write, half the cost of a write (benches/HISTORY.md,
/// round 2). It is deleted with its record; a torn spare (a crash while
/// writing it) is never read. The caller holds the handle's stripe: one
/// writer per spare.
/// The record file's stamp; `None` when `place` is [`Place::OverRecord`]
/// and the record was gone.
pub(super) fn write_record(
    dir: &Path,
    handle: &Handle,
    json: &[u8],
    fsync: bool,
    place: Place,
) -> io::Result<Option<Stamp>> {
    let spare = spare_of(dir, handle);
    let target = record_path(dir, handle);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let written = (|| -> io::Result<(Placed, Stamp)> {
            let file = open_private(&spare)?;
            // No truncation to zero first: ext4 would start writeback at
            // close (`auto_da_alloc` again).
            std::os::unix::fs::FileExt::write_all_at(&file, json, 0)?;
            // Cut what is left of a longer older version. Truncating takes
            // the inode's lock and a journal entry even to the same size;
            // records rarely shrink, and `fstat` is far cheaper. A rename
            // keeps a file's modification time: the stamp holds.
            let mut written = file.metadata()?;
            if written.len() > json.len() as u64 {
                file.set_len(json.len() as u64)?;
                written = file.metadata()?;
            }
            if fsync {
                file.sync_all()?;
            }
            drop(file);
            let placed = put_in_place(&spare, &target, place)?;
            if fsync && placed != Placed::RecordGone {
                // The swap itself is durable only once the directory is.
                File::open(dir)?.sync_all()?;
            }
            Ok((placed, Stamp::of(&written)))
        })();
        match written {
            Ok((Placed::RecordGone, _)) => {
                // What is left of a deleted session goes with it.
                let _ = fs::remove_file(&spare);
                return Ok(None);
            }
            Ok((Placed::Swapped | Placed::Renamed, stamp)) => return Ok(Some(stamp)),
            // The sweep removed the spare between our open and the swap:
            // write into a new one.
            Err(error) if error.kind() == io::ErrorKind::NotFound && attempt < 3 => continue,
            Err(error) => return Err(error),
        }
    }
}

/// What a record file looked like when this process wrote it. A file
/// rewritten since, even in place, differs in one of these: its
/// modification time is fine-grained once it has been asked for (Linux's
/// multigrain timestamps, 6.13 and later, on ext4, xfs, btrfs and tmpfs;
/// before that, a rewrite of the same length within the same clock tick
/// goes unseen).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp {
    pub(super) inode: u64,
    pub(super) len: u64,
    /// Seconds and nanoseconds.
    pub(super) modified: (i64, i64),
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            inode: meta.ino(),
            len: meta.len(),
            modified: (meta.mtime(), meta.mtime_nsec()),
        }
    }

    /// The stamp of the file at `path`; `None` if there is none.
    pub(super) fn of_file(path: &Path) -> io::Result<Option<Stamp>> {
        match fs::symlink_metadata(path) {
            Ok(meta) => Ok(Some(Stamp::of(&meta))),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }
}

/// The spare file of `handle`'s record.
pub(super) fn spare_of(dir: &Path, handle: &Handle) -> PathBuf {
    path_in(dir, ".", handle, ".tmp")
}

/// The record file of `handle`.
pub(super) fn record_path(dir: &Path, handle: &Handle) -> PathBuf {
    path_in(dir, "", handle, ".json")
}

/// `dir/PREFIX HANDLE SUFFIX`, put together by hand: `Path::join` and
/// `format!` cost about 2 000 instructions a path (callgrind), and a
/// request that writes makes three.
fn path_in(dir: &Path, prefix: &str, handle: &Handle, suffix: &str) -> PathBuf {
    let dir = dir.as_os_str();
    let name = [prefix, handle.as_str(), suffix];
    let mut path =
        OsString::with_capacity(dir.len() + 1 + name.iter().map(|part| part.len()).sum::<usize>());
    if !dir.is_empty() {
        path.push(dir);
        path.push("/");
    }
    name.iter().for_each(|part| path.push(part));
    PathBuf::from(path)
}

/// How [`put_in_place`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Placed {
    /// Swapped with the previous record, which is now at `temp`.
    Swapped,
    /// Renamed: there was no record, or the file system cannot swap.
    Renamed,
    /// Not placed: [`Place::OverRecord`], and there was no record.
    RecordGone,
}

/// Moves the new record `temp` to `target` atomically: a reader sees the
/// old record or the new one, never none.
///
/// A swap (`renameat2(RENAME_EXCHANGE)`) rather than a rename over the old
/// file: ext4 starts writing back a file renamed over another at the rename
/// (`auto_da_alloc`), a device round trip on every session write, about 8×
/// the cost of the rest of the write (benches/HISTORY.md, round 2). Where
/// there is nothing to swap with (a new session) or the file system cannot
/// swap, a rename.
/// The swap also tells, at no cost, whether the record is still there;
/// where the file system cannot swap, that check and the rename are two
/// steps, and a delete by another process between them is undone.
pub(super) fn put_in_place(temp: &Path, target: &Path, place: Place) -> io::Result<Placed> {
    match exchange(temp, target) {
        Ok(()) => Ok(Placed::Swapped),
        Err(error)
            if matches!(
                error.raw_os_error(),
                Some(libc::ENOENT | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
            ) =>
        {
            if place == Place::OverRecord && !exists(target)? {
                return Ok(Placed::RecordGone);
            }
            fs::rename(temp, target).map(|()| Placed::Renamed)
        }
        Err(error) => Err(error),
    }
}

fn exists(path: &Path) -> io::Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
    }
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let a = CString::new(a.as_os_str().as_bytes())?;
    let b = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both paths are valid NUL-terminated strings that outlive the
    // call; renameat2 reads them and keeps no pointer.
    let status = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if status == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> io::Result<()> {
    Err(io::Error::from_raw_os_error(libc::ENOSYS))
}

/// A new file only its owner can read (on Unix): it holds session data.
fn create_private(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// The file at `path` for writing, created only its owner can read if it
/// is missing.
fn open_private(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Deletes the record file and its spare; `false` if there was no record.
///
/// Once the record is gone the session is deleted: a spare that cannot be
/// removed is logged and left to the sweep, not reported as a failed
/// delete (the caller would answer 503 for a session it had ended).
pub(super) fn remove_record(dir: &Path, path: &Path, fsync: bool) -> io::Result<bool> {
    let mut record_was_there = false;
    for file in removal_order(dir, path) {
        if file == path {
            record_was_there = remove_if_there(&file)?;
        } else if let Err(error) = remove_if_there(&file) {
            let short = path
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(handle_of_file)
                .map(|handle| handle.short().to_owned())
                .unwrap_or_default();
            log::warn!(
                "session {short} deleted; its spare in {} is left to the sweep: {error}",
                dir.display()
            );
        }
    }
    if record_was_there && fsync {
        File::open(dir)?.sync_all()?;
    }
    Ok(record_was_there)
}

/// The files a delete removes, in order: the record, then its spare. A
/// proxy writing the session meanwhile (the delete may run in another
/// process) then either swapped before the record went, leaving the old
/// version in the spare that goes next, or finds the record gone and
/// removes the spare itself. Spare first, a write in between would swap
/// the old version into a new spare that nothing removes.
pub(super) fn removal_order(dir: &Path, path: &Path) -> Vec<PathBuf> {
    let spare = path
        .file_name()
        .and_then(|name| name.to_str())
        .and_then(handle_of_file)
        .map(|handle| spare_of(dir, &handle));
    std::iter::once(path.to_owned()).chain(spare).collect()
}

/// Removes the file at `path`; `false` if there was none.
pub(super) fn remove_if_there(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
    }
}

/// The handle a directory entry is the record of: `HANDLE.json`.
pub(super) fn handle_of_file(name: &str) -> Option<Handle> {
    name.strip_suffix(".json").and_then(Handle::parse)
}

/// A temporary file of ours: a spare `.HANDLE.tmp`, a `.HANDLE.*.tmp` of an
/// earlier version, or a ping probe.
pub(super) fn is_temp_file(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

/// Every record file in `dir`, other files ignored.
pub(super) fn record_files(dir: &Path) -> Result<Vec<(Handle, PathBuf)>, StoreError> {
    let entries = fs::read_dir(dir).map_err(|error| {
        StoreError::Unavailable(format!(
            "cannot read the session directory {}: {error}",
            dir.display()
        ))
    })?;
    Ok(entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let handle = handle_of_file(entry.file_name().to_str()?)?;
            Some((handle, entry.path()))
        })
        .collect())
}

/// Scans `dir` for records that look expired (to be checked again under
/// their lock), removing stale temporary files on the way.
pub(super) fn expired_candidates(
    dir: &Path,
    now: u64,
    expiry: Expiry,
    limit: usize,
) -> Result<Vec<(Handle, PathBuf)>, StoreError> {
    let entries = fs::read_dir(dir).map_err(|error| {
        StoreError::Unavailable(format!(
            "cannot read the session directory {}: {error}",
            dir.display()
        ))
    })?;
    let mut candidates = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let path = entry.path();
        if is_temp_file(name) {
            if age(&path).is_some_and(|age| age > STALE_TEMP_AGE) {
                let _ = fs::remove_file(&path);
            }
        } else if let Some(handle) = handle_of_file(name) {
            match read_record(&path, handle.short(), limit) {
                Ok(Some(record)) if !expiry.is_expired(&record, now) => {}
                Ok(None) => {}
                // Expired, or unreadable (`sweep_record` decides).
                Ok(Some(_)) | Err(_) => candidates.push((handle, path)),
            }
        }
    }
    Ok(candidates)
}

/// Deletes the record in `path` if it is expired at `now`; `true` if it
/// did. A corrupt record has no times to read, and could never be loaded:
/// it goes once its file has not been written for the idle timeout, the
/// file's time being the only one left to go by.
pub(super) fn sweep_record(
    dir: &Path,
    path: &Path,
    short: &str,
    now: u64,
    expiry: Expiry,
    limit: usize,
    fsync: bool,
) -> Result<bool, StoreError> {
    let expired = match read_record(path, short, limit) {
        Ok(Some(record)) => expiry.is_expired(&record, now),
        Ok(None) => false,
        Err(StoreError::Corrupt { handle, detail }) => {
            let unwritten = age(path).is_some_and(|age| age.as_secs() > expiry.timeout);
            if unwritten {
                log::warn!("sweep: deleting corrupt session record {handle} ({detail})");
            }
            unwritten
        }
        Err(error) => return Err(error),
    };
    if !expired {
        return Ok(false);
    }
    remove_record(dir, path, fsync).map_err(|error| {
        StoreError::Unavailable(format!(
            "cannot delete session {short} in {}: {error}",
            dir.display()
        ))
    })
}

/// How long ago the file at `path` was last written.
fn age(path: &Path) -> Option<Duration> {
    let modified = fs::metadata(path).and_then(|meta| meta.modified()).ok()?;
    SystemTime::now().duration_since(modified).ok()
}

/// Writes and removes a probe file of a block: the one check that catches
/// a read-only mount, a full inode table and a full disk (where an empty
/// file can still be made, but no new session) as well as permissions.
pub(super) fn probe_writable(dir: &Path) -> io::Result<()> {
    let probe = dir.join(format!(".ping.{:016x}.tmp", rand::random::<u64>()));
    // ext4, xfs and tmpfs reserve the blocks at the write: a full disk
    // fails it, with no sync (which a health check polled every second
    // should not cost the disk).
    let written = create_private(&probe)
        .and_then(|mut file| io::Write::write_all(&mut file, &[b'\n'; PROBE_BYTES]));
    let removed = fs::remove_file(&probe);
    written.and(removed)
}

/// A block of the usual file systems.
const PROBE_BYTES: usize = 4096;

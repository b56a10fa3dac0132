//! Root-confined, read-only file lookup shared by the TFTP and HTTP edges.
//!
//! Owns the one rule every file-serving path obeys: a client-supplied name resolves to a
//! regular file *inside* a configured root, whatever the name contains (`..`, absolute
//! paths, backslashes, NULs, symlinks pointing out). Small files are kept in memory so hot
//! boot binaries (iPXE is a few hundred KB and every machine fetches it) cost no disk I/O;
//! a cached copy is revalidated against the file's size and mtime on every open.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;

/// Why a name could not be served.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("path {0:?} is not allowed")]
    Forbidden(String),
    #[error("file {0:?} not found")]
    NotFound(String),
    #[error("{path:?}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl FileError {
    /// Stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            FileError::Forbidden(_) => "forbidden",
            FileError::NotFound(_) => "not_found",
            FileError::Io { .. } => "io",
        }
    }
}

/// The bytes of an opened file: from memory when small, else an open handle.
#[derive(Debug, Clone)]
pub enum Contents {
    Memory(Bytes),
    File(Arc<File>),
}

/// An opened, regular file inside the root.
#[derive(Debug, Clone)]
pub struct OpenFile {
    pub path: PathBuf,
    pub len: u64,
    pub modified: SystemTime,
    pub contents: Contents,
}

impl OpenFile {
    /// A strong validator derived from size and mtime (what nginx does, too).
    pub fn etag(&self) -> String {
        let mtime = self
            .modified
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        format!("\"{:x}-{:x}\"", mtime, self.len)
    }

    /// Reads `len` bytes at `offset` (blocking for on-disk files; call off the reactor).
    pub fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Bytes> {
        match &self.contents {
            Contents::Memory(b) => {
                let start = (offset as usize).min(b.len());
                let end = start.saturating_add(len).min(b.len());
                Ok(b.slice(start..end))
            }
            Contents::File(f) => {
                use std::os::unix::fs::FileExt;
                let want = (self.len.saturating_sub(offset) as usize).min(len);
                let mut buf = vec![0u8; want];
                let mut done = 0;
                while done < want {
                    let n = f.read_at(&mut buf[done..], offset + done as u64)?;
                    if n == 0 {
                        break;
                    }
                    done += n;
                }
                buf.truncate(done);
                Ok(Bytes::from(buf))
            }
        }
    }
}

/// Limits of the in-memory cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    /// Files up to this size are served from memory.
    pub file_bytes: u64,
    /// Total bytes the cache may hold; past it, files are read from disk.
    pub total_bytes: u64,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            file_bytes: 8 << 20,
            total_bytes: 128 << 20,
        }
    }
}

#[derive(Debug)]
struct Cached {
    len: u64,
    modified: SystemTime,
    bytes: Bytes,
}

/// A read-only file root.
#[derive(Debug)]
pub struct FileRoot {
    root: PathBuf,
    /// Consulted, with the same confinement, for names the root does not hold.
    fallback: Option<PathBuf>,
    limits: CacheLimits,
    cache: Mutex<HashMap<PathBuf, Cached>>,
    /// Names already resolved to a cached canonical path: the fast path's index. Keyed
    /// apart for client names (relative, confined) and trusted configured paths.
    resolved: Mutex<HashMap<(bool, PathBuf), PathBuf>>,
}

/// Normalises a client-supplied name into a relative path, refusing anything that could
/// leave the root. Backslashes are treated as separators (Windows boot loaders ask for
/// `boot\x64\wdsnbp.com`) *before* the check, so they cannot smuggle a `..` past it. A
/// leading `/` is allowed and means the root, as tftpd-hpa's `-s` does.
pub fn sanitize(name: &str) -> Result<PathBuf, FileError> {
    let forbidden = || FileError::Forbidden(name.to_string());
    if name.is_empty() || name.len() > 1024 || name.chars().any(|c| c.is_control()) {
        return Err(forbidden());
    }
    let unified = name.replace('\\', "/");
    let mut out = PathBuf::new();
    for part in unified.split('/') {
        match part {
            "" | "." => continue,
            ".." => return Err(forbidden()),
            p => {
                // Drive letters and similar prefixes have no meaning here.
                if p.contains(':') && p.len() == 2 {
                    return Err(forbidden());
                }
                match Path::new(p).components().next() {
                    Some(Component::Normal(_)) => out.push(p),
                    _ => return Err(forbidden()),
                }
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(forbidden());
    }
    Ok(out)
}

impl FileRoot {
    /// A root at `root` (need not exist yet; lookups then find nothing).
    pub fn new(root: impl Into<PathBuf>, limits: CacheLimits) -> Self {
        FileRoot {
            root: root.into(),
            fallback: None,
            limits,
            cache: Mutex::new(HashMap::new()),
            resolved: Mutex::new(HashMap::new()),
        }
    }

    /// Names missing from the root are looked up in `dir` too (iPXE binaries from the
    /// distribution's package). Names are confined to `dir` as to the root, but its
    /// symlinks are followed wherever they point: it must be a folder only root writes.
    pub fn with_fallback(mut self, dir: Option<PathBuf>) -> Self {
        self.fallback = dir;
        self
    }

    /// The configured root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder consulted after the root, if any.
    pub fn fallback(&self) -> Option<&Path> {
        self.fallback.as_deref()
    }

    /// The fast path for hot files: a name opened before whose file is held in memory is
    /// answered with one `stat` of its resolved path and no open, so it can run inline on
    /// a request path. `None` means "use [`FileRoot::open`]" (not cached, or changed).
    pub fn open_cached(&self, name: &str) -> Option<OpenFile> {
        self.fast((false, sanitize(name).ok()?))
    }

    /// [`FileRoot::open_cached`] for an operator-configured path.
    pub fn open_trusted_cached(&self, path: &Path) -> Option<OpenFile> {
        self.fast((true, path.to_path_buf()))
    }

    fn fast(&self, key: (bool, PathBuf)) -> Option<OpenFile> {
        let path = self
            .resolved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)?
            .clone();
        let meta = std::fs::metadata(&path).ok()?;
        let modified = meta.modified().ok()?;
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let c = cache.get(&path)?;
        (meta.is_file() && c.len == meta.len() && c.modified == modified).then(|| OpenFile {
            path: path.clone(),
            len: c.len,
            modified,
            contents: Contents::Memory(c.bytes.clone()),
        })
    }

    fn remember(&self, key: (bool, PathBuf), file: &OpenFile) {
        if matches!(file.contents, Contents::Memory(_)) {
            let mut resolved = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
            // Only names that resolved to cached files get here, so clients cannot grow
            // it with names that do not exist; the bound is a backstop.
            if resolved.len() < 10_000 {
                resolved.insert(key, file.path.clone());
            }
        }
    }

    /// Resolves `name` to a regular file inside the root and opens it (blocking).
    pub fn open(&self, name: &str) -> Result<OpenFile, FileError> {
        let rel = sanitize(name)?;
        let path = match (Self::confined(&self.root, &rel, name), &self.fallback) {
            // The fallback is a distribution's package folder, written by root only, whose
            // links point where the package put the files (Debian links ipxe.efi to
            // /boot): the name stays confined, its links are trusted.
            (Err(FileError::NotFound(_)), Some(dir)) => dir
                .join(&rel)
                .canonicalize()
                .map_err(|_| FileError::NotFound(name.to_string()))?,
            (other, _) => other?,
        };
        let file = self.open_resolved(path, name)?;
        self.remember((false, rel), &file);
        Ok(file)
    }

    /// `rel` resolved inside `root`, symlinks followed, or why not.
    fn confined(root: &Path, rel: &Path, name: &str) -> Result<PathBuf, FileError> {
        let not_found = || FileError::NotFound(name.to_string());
        let root = root.canonicalize().map_err(|_| not_found())?;
        // Canonicalising resolves every symlink; a target outside the root is refused even
        // though the name itself was clean.
        let path = root.join(rel).canonicalize().map_err(|_| not_found())?;
        if !path.starts_with(&root) {
            return Err(FileError::Forbidden(name.to_string()));
        }
        Ok(path)
    }

    /// Opens an operator-configured path (no client input in it, so no confinement).
    pub fn open_trusted(&self, path: &Path) -> Result<OpenFile, FileError> {
        let shown = path.display().to_string();
        let canonical = path
            .canonicalize()
            .map_err(|_| FileError::NotFound(shown.clone()))?;
        let file = self.open_resolved(canonical, &shown)?;
        self.remember((true, path.to_path_buf()), &file);
        Ok(file)
    }

    fn open_resolved(&self, path: PathBuf, shown: &str) -> Result<OpenFile, FileError> {
        let io = |source| FileError::Io {
            path: shown.to_string(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(FileError::NotFound(shown.to_string()));
        }
        let len = meta.len();
        let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if len <= self.limits.file_bytes
            && let Some(bytes) = self.cached(&path, len, modified, &file).map_err(io)?
        {
            return Ok(OpenFile {
                path,
                len,
                modified,
                contents: Contents::Memory(bytes),
            });
        }
        Ok(OpenFile {
            path,
            len,
            modified,
            contents: Contents::File(Arc::new(file)),
        })
    }

    fn cached(
        &self,
        path: &Path,
        len: u64,
        modified: SystemTime,
        file: &File,
    ) -> std::io::Result<Option<Bytes>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(path)
            && c.len == len
            && c.modified == modified
        {
            return Ok(Some(c.bytes.clone()));
        }
        cache.remove(path);
        let held: u64 = cache.values().map(|c| c.len).sum();
        if held + len > self.limits.total_bytes {
            return Ok(None);
        }
        let mut buf = Vec::with_capacity(len as usize);
        use std::io::Read;
        file.take(len).read_to_end(&mut buf)?;
        if buf.len() as u64 != len {
            // Changed under us; serve from disk this time.
            return Ok(None);
        }
        let bytes = Bytes::from(buf);
        cache.insert(
            path.to_path_buf(),
            Cached {
                len,
                modified,
                bytes: bytes.clone(),
            },
        );
        Ok(Some(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_refuses_escapes() {
        for bad in [
            "",
            "..",
            "../etc/passwd",
            "a/../../b",
            "..\\..\\windows",
            "a\\..\\..\\b",
            "c:",
            "/",
            "a\nb",
            "a\0b",
        ] {
            assert!(sanitize(bad).is_err(), "{bad:?} must be refused");
        }
        assert_eq!(
            sanitize("/pxelinux.0").unwrap(),
            PathBuf::from("pxelinux.0")
        );
        assert_eq!(
            sanitize("boot\\x64\\wdsnbp.com").unwrap(),
            PathBuf::from("boot/x64/wdsnbp.com")
        );
        assert_eq!(sanitize("./a//b").unwrap(), PathBuf::from("a/b"));
    }

    #[test]
    fn open_confines_symlinks_and_caches() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(dir.path().join("secret"), b"outside").unwrap();
        std::fs::write(root.join("ok"), b"inside").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("escape")).unwrap();
        std::os::unix::fs::symlink(root.join("ok"), root.join("alias")).unwrap();
        let fr = FileRoot::new(&root, CacheLimits::default());
        assert!(matches!(fr.open("escape"), Err(FileError::Forbidden(_))));
        assert!(matches!(fr.open("missing"), Err(FileError::NotFound(_))));
        let f = fr.open("alias").unwrap();
        assert!(matches!(f.contents, Contents::Memory(_)));
        assert_eq!(&f.read_at(2, 100).unwrap()[..], b"side");
        // A rewrite with a different size is seen at once.
        std::fs::write(root.join("ok"), b"changed!").unwrap();
        assert_eq!(
            &fr.open("ok").unwrap().read_at(0, 100).unwrap()[..],
            b"changed!"
        );
    }

    #[test]
    fn fallback_serves_what_the_root_lacks_and_follows_its_links() {
        let dir = tempfile::tempdir().unwrap();
        let (root, ipxe) = (dir.path().join("root"), dir.path().join("ipxe"));
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(&ipxe).unwrap();
        std::fs::write(root.join("ipxe.efi"), b"operator's").unwrap();
        std::fs::write(ipxe.join("ipxe.efi"), b"package's").unwrap();
        std::fs::write(ipxe.join("undionly.kpxe"), b"package's bios").unwrap();
        std::fs::write(dir.path().join("secret"), b"outside").unwrap();
        // As Debian's /usr/lib/ipxe/ipxe.efi -> /boot/ipxe.efi.
        std::os::unix::fs::symlink(dir.path().join("secret"), ipxe.join("linked.efi")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("escape")).unwrap();
        let fr = FileRoot::new(&root, CacheLimits::default()).with_fallback(Some(ipxe));
        let read = |n: &str| fr.open(n).unwrap().read_at(0, 100).unwrap();
        assert_eq!(&read("ipxe.efi")[..], b"operator's", "the root wins");
        assert_eq!(&read("undionly.kpxe")[..], b"package's bios");
        assert_eq!(
            &read("linked.efi")[..],
            b"outside",
            "the package's links are followed"
        );
        assert!(
            matches!(fr.open("escape"), Err(FileError::Forbidden(_))),
            "the root's links are not"
        );
        assert!(matches!(fr.open("../secret"), Err(FileError::Forbidden(_))));
        assert!(matches!(fr.open("nothing"), Err(FileError::NotFound(_))));
    }

    #[test]
    fn fast_path_serves_cached_files_and_notices_changes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ipxe.efi"), b"v1").unwrap();
        let fr = FileRoot::new(dir.path(), CacheLimits::default());
        assert!(fr.open_cached("ipxe.efi").is_none(), "not opened yet");
        fr.open("ipxe.efi").unwrap();
        let f = fr.open_cached("/ipxe.efi").unwrap();
        assert_eq!(&f.read_at(0, 10).unwrap()[..], b"v1");
        std::fs::write(dir.path().join("ipxe.efi"), b"v2!").unwrap();
        assert!(
            fr.open_cached("ipxe.efi").is_none(),
            "a changed file takes the slow path"
        );
        std::fs::remove_file(dir.path().join("ipxe.efi")).unwrap();
        assert!(fr.open_cached("ipxe.efi").is_none());
        assert!(fr.open_cached("../x").is_none());
    }

    #[test]
    fn large_files_stay_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("big"), vec![7u8; 4096]).unwrap();
        let fr = FileRoot::new(
            dir.path(),
            CacheLimits {
                file_bytes: 1024,
                total_bytes: 1 << 20,
            },
        );
        let f = fr.open("big").unwrap();
        assert!(matches!(f.contents, Contents::File(_)));
        assert_eq!(f.read_at(4000, 200).unwrap().len(), 96);
    }
}

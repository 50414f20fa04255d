//! A small tmpfs mounted for a test, to fill up: a full disk on demand.
//! Shared by the end-to-end tests (through `support`) and the store tests
//! (by `#[path]`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted at a directory, unmounted (lazily) on drop.
pub struct SmallFileSystem(PathBuf);

impl SmallFileSystem {
    /// Mounts a tmpfs of `size` (mount's syntax: "64k") at `dir`, made if
    /// missing. `None`, loudly, where this process may not mount one (not
    /// root), unless the services are required (CI, which runs as root).
    pub fn mount(dir: &Path, size: &str) -> Option<SmallFileSystem> {
        std::fs::create_dir_all(dir).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|status| status.success());
        if !mounted {
            assert!(
                std::env::var("SESSION_PROXY_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "cannot mount a small tmpfs, and SESSION_PROXY_REQUIRE_SERVICES=1"
            );
            eprintln!("SKIPPED: cannot mount a small tmpfs here (not root?)");
            return None;
        }
        Some(SmallFileSystem(dir.to_owned()))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Fills what room is left with a file named `name`.
    pub fn fill(&self, name: &str) {
        let mut filler = std::fs::File::create(self.0.join(name)).unwrap();
        while std::io::Write::write_all(&mut filler, &[0; 1024]).is_ok() {}
    }
}

impl Drop for SmallFileSystem {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

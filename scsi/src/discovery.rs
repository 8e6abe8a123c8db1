//! Enumerates the SCSI generic (`sg`) devices the kernel exposes under
//! `/sys/class/scsi_generic`, with the SCSI address and the attributes sysfs
//! knows about each (vendor, model, revision, device type, block device).
//!
//! The sysfs and `/dev` roots are parameters ([`list_generic_devices_in`])
//! so the walk can be tested against a fake tree. To tell which device is
//! which logical unit across hosts, open it and ask for its VPD 0x83
//! designators ([`crate::inquiry::identify`]); names such as `sg3` or `sdb`
//! differ between hosts and boots. Several nodes with one identity are
//! several paths to one logical unit ([`group_by_identity`]).
//!
//! No-panic contract: any sysfs content (missing, unreadable, non-UTF-8 or
//! nonsensical attributes, dangling links) is tolerated; an attribute that
//! cannot be read or parsed becomes `None`. Only a missing or unreadable
//! class directory is an error.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// One SCSI generic device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenericDevice {
    /// The kernel name, e.g. `sg3`.
    pub name: String,
    /// The device node, e.g. `/dev/sg3`.
    pub dev_path: PathBuf,
    /// The SCSI address host:channel:target:lun, e.g. `2:0:0:1`.
    pub hctl: Option<String>,
    /// The peripheral device type (0 = disk), from `device/type`.
    pub device_type: Option<u8>,
    /// The T10 vendor identification, from `device/vendor`.
    pub vendor: Option<String>,
    /// The product identification, from `device/model`.
    pub model: Option<String>,
    /// The product revision, from `device/rev`.
    pub revision: Option<String>,
    /// The block device of the same logical unit, e.g. `sdb` (disks only).
    pub block_device: Option<String>,
}

/// Why the sg devices could not be listed.
#[non_exhaustive]
#[derive(thiserror::Error, Debug)]
pub enum DiscoveryError {
    /// The sysfs class directory does not exist.
    #[error(
        "no SCSI generic class at {} — this kernel has no sg driver (load it with `modprobe sg`)",
        path.display()
    )]
    NoScsiGeneric {
        /// The directory looked for.
        path: PathBuf,
    },
    /// A directory could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// What was being read.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Lists the sg devices of this machine (`/sys` and `/dev`).
pub fn list_generic_devices() -> Result<Vec<GenericDevice>, DiscoveryError> {
    list_generic_devices_in(Path::new("/sys"), Path::new("/dev"))
}

/// Lists the sg devices found under `<sys_root>/class/scsi_generic`, with
/// device nodes under `dev_root`, sorted by their number (`sg2` before
/// `sg10`; names without a number last, by name).
pub fn list_generic_devices_in(
    sys_root: &Path,
    dev_root: &Path,
) -> Result<Vec<GenericDevice>, DiscoveryError> {
    let class = sys_root.join("class").join("scsi_generic");
    let io_err = |source| DiscoveryError::Io {
        path: class.clone(),
        source,
    };
    let entries = match fs::read_dir(&class) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(DiscoveryError::NoScsiGeneric { path: class });
        }
        Err(e) => return Err(io_err(e)),
    };
    let mut devices = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        devices.push(describe(&entry.path(), name, dev_root));
    }
    devices.sort_by(|a, b| sort_key(&a.name).cmp(&sort_key(&b.name)));
    Ok(devices)
}

/// Orders `sgN` by N, anything else after them by name.
fn sort_key(name: &str) -> (u64, &str) {
    let index = name
        .strip_prefix("sg")
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    (index, name)
}

/// Gathers what sysfs says about the sg device at `class_entry`.
fn describe(class_entry: &Path, name: String, dev_root: &Path) -> GenericDevice {
    let device = class_entry.join("device");
    GenericDevice {
        dev_path: dev_root.join(&name),
        name,
        hctl: hctl(&device),
        device_type: attr(&device, "type").and_then(|t| t.parse().ok()),
        vendor: attr(&device, "vendor"),
        model: attr(&device, "model"),
        revision: attr(&device, "rev"),
        block_device: block_device(&device),
    }
}

/// The SCSI address: the last component of the `device` link's target (or,
/// failing that, of its resolved path), if it has the `h:c:t:l` form.
fn hctl(device: &Path) -> Option<String> {
    let target = fs::read_link(device)
        .or_else(|_| fs::canonicalize(device))
        .ok()?;
    let last = target.file_name()?.to_str()?;
    let parts: Vec<&str> = last.split(':').collect();
    let numeric = parts.len() == 4 && parts.iter().all(|p| p.parse::<u64>().is_ok());
    numeric.then(|| last.to_string())
}

/// A text attribute with surrounding whitespace (and NULs) trimmed; `None`
/// when unreadable or empty.
fn attr(dir: &Path, file: &str) -> Option<String> {
    let bytes = fs::read(dir.join(file)).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!text.is_empty()).then(|| text.to_string())
}

/// The first entry (by name) of `device/block/`, e.g. `sdb`.
fn block_device(device: &Path) -> Option<String> {
    fs::read_dir(device.join("block"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .min()
}

/// Groups items (paths) by the identity of the logical unit each reaches:
/// items with the same `Some(id)` form one group, in the order their
/// identity first appears; an item without identity stays alone. This is
/// how several `/dev/sgN` nodes (target ports, host adapters) onto one LUN
/// are found: the same NAA designator through each.
pub fn group_by_identity<T>(
    items: impl IntoIterator<Item = (Option<String>, T)>,
) -> Vec<(Option<String>, Vec<T>)> {
    let mut groups: Vec<(Option<String>, Vec<T>)> = Vec::new();
    for (id, item) in items {
        match id
            .as_ref()
            .and_then(|id| groups.iter_mut().find(|(g, _)| g.as_ref() == Some(id)))
        {
            Some((_, list)) => list.push(item),
            None => groups.push((id, vec![item])),
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A scratch directory removed on drop.
    struct TempTree(PathBuf);

    impl TempTree {
        fn new(tag: &str) -> TempTree {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "stp-discovery-{tag}-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempTree(dir)
        }
    }

    impl Drop for TempTree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const HOST2: &str = "devices/pci0000:00/0000:00:05.0/host2";
    const HOST3: &str = "devices/platform/host3";

    /// Creates `<sys>/<host>/target…/<hctl>` with the given attribute files,
    /// its `scsi_generic/<sg>` dir with the `device` link, and the class link.
    fn add_sg(sys: &Path, host: &str, hctl: &str, sg: &str, attrs: &[(&str, &str)]) -> PathBuf {
        let (h, rest) = hctl.split_once(':').unwrap();
        let target = format!("target{h}:{}", rest.rsplit_once(':').unwrap().0);
        let lu_rel = format!("{host}/{target}/{hctl}");
        let lu = sys.join(&lu_rel);
        let sg_dir = lu.join("scsi_generic").join(sg);
        fs::create_dir_all(&sg_dir).unwrap();
        for (file, text) in attrs {
            fs::write(lu.join(file), text).unwrap();
        }
        symlink(format!("../../../{hctl}"), sg_dir.join("device")).unwrap();
        let class = sys.join("class/scsi_generic");
        fs::create_dir_all(&class).unwrap();
        symlink(format!("../../{lu_rel}/scsi_generic/{sg}"), class.join(sg)).unwrap();
        lu
    }

    #[test]
    fn lists_a_fake_tree() {
        let tree = TempTree::new("list");
        let sys = tree.0.join("sys");
        let dev = tree.0.join("dev");
        // Created out of order: the listing sorts by number.
        let lu10 = add_sg(
            &sys,
            HOST3,
            "3:0:0:0",
            "sg10",
            &[
                ("type", "12\n"),
                ("vendor", "LIO-ORG \n"),
                ("model", "enclosure       \n"),
            ],
        );
        // sg10's revision exists but cannot be read as a file.
        fs::create_dir(lu10.join("rev")).unwrap();
        let lu1 = add_sg(
            &sys,
            HOST2,
            "2:0:0:1",
            "sg1",
            &[
                ("type", "0\n"),
                ("model", "stp-lun1        \n"),
                ("rev", "4.0 \n"),
            ],
        );
        fs::create_dir_all(lu1.join("block/sdc")).unwrap();
        let lu0 = add_sg(
            &sys,
            HOST2,
            "2:0:0:0",
            "sg0",
            &[
                ("type", "0\n"),
                ("vendor", "LIO-ORG \n"),
                ("model", "stp-lun0        \n"),
                ("rev", "4.0 \n"),
            ],
        );
        fs::create_dir_all(lu0.join("block/sdb")).unwrap();

        let list = list_generic_devices_in(&sys, &dev).unwrap();
        let names: Vec<&str> = list.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["sg0", "sg1", "sg10"]);
        assert_eq!(
            list[0],
            GenericDevice {
                name: "sg0".into(),
                dev_path: dev.join("sg0"),
                hctl: Some("2:0:0:0".into()),
                device_type: Some(0),
                vendor: Some("LIO-ORG".into()),
                model: Some("stp-lun0".into()),
                revision: Some("4.0".into()),
                block_device: Some("sdb".into()),
            }
        );
        // sg1: no vendor file.
        assert_eq!(list[1].vendor, None);
        assert_eq!(list[1].model.as_deref(), Some("stp-lun1"));
        assert_eq!(list[1].hctl.as_deref(), Some("2:0:0:1"));
        assert_eq!(list[1].block_device.as_deref(), Some("sdc"));
        // sg10: no block device, unreadable revision.
        assert_eq!(list[2].hctl.as_deref(), Some("3:0:0:0"));
        assert_eq!(list[2].device_type, Some(12));
        assert_eq!(list[2].revision, None);
        assert_eq!(list[2].block_device, None);
        assert_eq!(list[2].dev_path, dev.join("sg10"));
    }

    #[test]
    fn odd_entries_do_not_fail_the_listing() {
        let tree = TempTree::new("odd");
        let sys = tree.0.join("sys");
        let class = sys.join("class/scsi_generic");
        fs::create_dir_all(&class).unwrap();
        // A dangling class link and a plain directory without a device link.
        symlink("../../devices/gone/sg5", class.join("sg5")).unwrap();
        fs::create_dir(class.join("sgx")).unwrap();
        // A device whose type is garbage and whose link is not an H:C:T:L.
        let lu = sys.join("devices/weird");
        fs::create_dir_all(lu.join("scsi_generic/sg2")).unwrap();
        fs::write(lu.join("type"), "disk\n").unwrap();
        fs::write(lu.join("vendor"), [0xFF, b' ', b'\n']).unwrap();
        symlink("../..", lu.join("scsi_generic/sg2/device")).unwrap();
        symlink("../../devices/weird/scsi_generic/sg2", class.join("sg2")).unwrap();

        let list = list_generic_devices_in(&sys, Path::new("/dev")).unwrap();
        let names: Vec<&str> = list.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["sg2", "sg5", "sgx"]);
        assert_eq!(list[0].hctl, None);
        assert_eq!(list[0].device_type, None);
        assert_eq!(list[0].vendor.as_deref(), Some("\u{FFFD}"));
        for d in &list[1..] {
            assert_eq!((&d.hctl, &d.vendor, &d.block_device), (&None, &None, &None));
        }
    }

    #[test]
    fn paths_group_by_identity() {
        let items = [
            (Some("naa.1".to_string()), "sg0"),
            (Some("naa.2".to_string()), "sg1"),
            (None, "sg2"),
            (Some("naa.1".to_string()), "sg3"),
            (None, "sg4"),
        ];
        let groups = group_by_identity(items);
        assert_eq!(
            groups,
            vec![
                (Some("naa.1".to_string()), vec!["sg0", "sg3"]),
                (Some("naa.2".to_string()), vec!["sg1"]),
                (None, vec!["sg2"]),
                (None, vec!["sg4"]),
            ]
        );
    }

    #[test]
    fn missing_class_dir_is_no_scsi_generic() {
        let tree = TempTree::new("empty");
        let err = list_generic_devices_in(&tree.0, Path::new("/dev")).unwrap_err();
        let DiscoveryError::NoScsiGeneric { path } = &err else {
            panic!("expected NoScsiGeneric, got {err:?}");
        };
        assert_eq!(*path, tree.0.join("class/scsi_generic"));
        assert!(err.to_string().contains("modprobe sg"), "{err}");
    }

    #[test]
    fn class_path_that_is_a_file_is_an_io_error() {
        let tree = TempTree::new("file");
        fs::create_dir_all(tree.0.join("class")).unwrap();
        fs::write(tree.0.join("class/scsi_generic"), "").unwrap();
        let err = list_generic_devices_in(&tree.0, Path::new("/dev")).unwrap_err();
        assert!(matches!(err, DiscoveryError::Io { .. }), "{err:?}");
    }

    #[test]
    fn this_machine_lists_or_reports_no_sg() {
        // The build machine may have no SCSI at all; either answer is fine,
        // but it must not panic or fail otherwise.
        match list_generic_devices() {
            Ok(list) => assert!(list.iter().all(|d| d.dev_path.starts_with("/dev"))),
            Err(DiscoveryError::NoScsiGeneric { .. }) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}

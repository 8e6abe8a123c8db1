//! Finding the TCMU devices to serve: the uio name the kernel gives a user
//! backstore, the backstore's `cfg`, and the scan of `<sysfs>/class/uio`.

use std::fs;
use std::io;
use std::path::Path;

/// The `dev_config` subtype this daemon serves (`dev_config=stp/<cfg>`).
pub const SUBTYPE: &str = "stp";

/// The parts of a TCMU device's uio name,
/// `tcm-user/<hba>/<backstore name>/<subtype>/<cfg>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UioName {
    /// The HBA number: the backstore lives in `target/core/user_<hba>/`.
    pub hba: u32,
    /// The backstore's name (its configfs directory).
    pub backstore: String,
    /// The handler subtype, the part of `dev_config` before the first `/`.
    pub subtype: String,
    /// The rest of `dev_config` (may be empty, may contain `/`).
    pub cfg: String,
}

impl UioName {
    /// Parses a uio `name` (trailing whitespace ignored); `None` for a uio
    /// device that is not a TCMU device with a `dev_config`.
    pub fn parse(name: &str) -> Option<UioName> {
        let mut parts = name.trim_end().splitn(5, '/');
        if parts.next()? != "tcm-user" {
            return None;
        }
        let hba = parts.next()?.parse().ok()?;
        let backstore = parts.next()?.to_owned();
        let subtype = parts.next()?.to_owned();
        let cfg = parts.next().unwrap_or("").to_owned();
        if backstore.is_empty() {
            return None;
        }
        Some(UioName {
            hba,
            backstore,
            subtype,
            cfg,
        })
    }
}

/// What a backstore's `cfg` names: the array LUN behind it and the
/// initiator (host path) whose commands it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// The array LUN.
    pub lun: u64,
    /// The initiator name (`[A-Za-z0-9_.:-]+`).
    pub initiator: String,
}

/// A `cfg` this daemon cannot use.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CfgError {
    /// A required key is absent.
    #[error("cfg {cfg:?} has no {key}= (expected lun=<id>,initiator=<name>; note that the backstore's control file splits its settings at commas, so write dev_config through attrib/dev_config, or separate the pairs with ';')")]
    Missing {
        /// The key.
        key: &'static str,
        /// The whole cfg.
        cfg: String,
    },
    /// A pair is not `key=value`, or a key appears twice.
    #[error("cfg {cfg:?}: {why}")]
    Syntax {
        /// What is wrong.
        why: String,
        /// The whole cfg.
        cfg: String,
    },
    /// `lun=` is not a number.
    #[error("cfg {cfg:?}: lun={value:?} is not a LUN number")]
    BadLun {
        /// The value given.
        value: String,
        /// The whole cfg.
        cfg: String,
    },
    /// `initiator=` has characters outside `[A-Za-z0-9_.:-]`, or is empty.
    #[error("cfg {cfg:?}: initiator={value:?} must be one or more of A-Z a-z 0-9 _ . : -")]
    BadInitiator {
        /// The value given.
        value: String,
        /// The whole cfg.
        cfg: String,
    },
}

impl DeviceConfig {
    /// Parses `lun=<id>,initiator=<name>`: `key=value` pairs separated by
    /// `,` (or `;`, which survives the backstore's `control` file), in any
    /// order; unknown keys are ignored, empty pairs skipped.
    pub fn parse(cfg: &str) -> Result<DeviceConfig, CfgError> {
        let mut lun = None;
        let mut initiator = None;
        for pair in cfg.trim().split([',', ';']) {
            let pair = pair.trim();
            if pair.is_empty() {
                continue;
            }
            let Some((key, value)) = pair.split_once('=') else {
                return Err(CfgError::Syntax {
                    why: format!("{pair:?} is not key=value"),
                    cfg: cfg.into(),
                });
            };
            let slot = match key {
                "lun" => &mut lun,
                "initiator" => &mut initiator,
                _ => continue,
            };
            if slot.is_some() {
                return Err(CfgError::Syntax {
                    why: format!("{key}= given twice"),
                    cfg: cfg.into(),
                });
            }
            *slot = Some(value.to_owned());
        }
        let lun = lun.ok_or_else(|| CfgError::Missing {
            key: "lun",
            cfg: cfg.into(),
        })?;
        let initiator = initiator.ok_or_else(|| CfgError::Missing {
            key: "initiator",
            cfg: cfg.into(),
        })?;
        let lun = lun.parse::<u64>().map_err(|_| CfgError::BadLun {
            value: lun.clone(),
            cfg: cfg.into(),
        })?;
        let valid = |c: char| c.is_ascii_alphanumeric() || "_.:-".contains(c);
        if initiator.is_empty() || !initiator.chars().all(valid) {
            return Err(CfgError::BadInitiator {
                value: initiator,
                cfg: cfg.into(),
            });
        }
        Ok(DeviceConfig { lun, initiator })
    }
}

/// A uio device whose name has the subtype [`SUBTYPE`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Found {
    /// The uio node (`uio3`).
    pub uio: String,
    /// The uio name as read (trailing newline removed).
    pub raw_name: String,
    /// Its parts.
    pub name: UioName,
}

/// Lists the TCMU devices in `<sysfs>/class/uio` whose subtype is
/// [`SUBTYPE`], in uio number order. Unreadable entries (a device removed
/// mid-scan) are skipped.
pub(crate) fn scan(sysfs: &Path) -> io::Result<Vec<Found>> {
    let class = sysfs.join("class/uio");
    let mut found = Vec::new();
    for entry in fs::read_dir(&class)? {
        let Ok(entry) = entry else { continue };
        let uio = entry.file_name().to_string_lossy().into_owned();
        let Some(n) = uio.strip_prefix("uio").and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(raw) = fs::read_to_string(class.join(&uio).join("name")) else {
            continue;
        };
        let raw_name = raw.trim_end_matches(['\n', '\r']).to_owned();
        if let Some(name) = UioName::parse(&raw_name) {
            if name.subtype == SUBTYPE {
                found.push((
                    n,
                    Found {
                        uio,
                        raw_name,
                        name,
                    },
                ));
            }
        }
    }
    found.sort_by_key(|(n, _)| *n);
    Ok(found.into_iter().map(|(_, f)| f).collect())
}

/// The size of map 0 of uio device `uio` (`maps/map0/size`, hex).
pub(crate) fn map_size(sysfs: &Path, uio: &str) -> io::Result<usize> {
    let path = sysfs.join("class/uio").join(uio).join("maps/map0/size");
    let text = fs::read_to_string(&path)?;
    let t = text.trim();
    let hex = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    usize::from_str_radix(hex, 16).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {t:?} is not a hex size", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uio_names_parse() {
        let n = UioName::parse("tcm-user/1/stp_l0_h0/stp/lun=0,initiator=h0\n").unwrap();
        assert_eq!(
            n,
            UioName {
                hba: 1,
                backstore: "stp_l0_h0".into(),
                subtype: "stp".into(),
                cfg: "lun=0,initiator=h0".into(),
            }
        );
        // The cfg may itself contain '/'.
        let n = UioName::parse("tcm-user/12/x/stp/a/b=c").unwrap();
        assert_eq!((n.hba, n.cfg.as_str()), (12, "a/b=c"));
        // No cfg at all.
        let n = UioName::parse("tcm-user/1/x/stp").unwrap();
        assert_eq!(n.cfg, "");
        for bad in [
            "tcm-user/1/x",
            "tcm-user/one/x/stp/lun=0",
            "uio_pci_generic",
            "",
            "tcm-user/1//stp/lun=0",
        ] {
            assert_eq!(UioName::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn cfgs_parse() {
        let ok = |s: &str| DeviceConfig::parse(s).unwrap();
        assert_eq!(
            ok("lun=3,initiator=host-a.p1:x_y"),
            DeviceConfig {
                lun: 3,
                initiator: "host-a.p1:x_y".into()
            }
        );
        assert_eq!(ok("initiator=h;lun=7").lun, 7);
        assert_eq!(ok(" lun=0 ,, initiator=h , color=blue").initiator, "h");
        assert!(matches!(
            DeviceConfig::parse("lun=0"),
            Err(CfgError::Missing {
                key: "initiator",
                ..
            })
        ));
        assert!(matches!(
            DeviceConfig::parse("initiator=h"),
            Err(CfgError::Missing { key: "lun", .. })
        ));
        assert!(matches!(
            DeviceConfig::parse("lun=x,initiator=h"),
            Err(CfgError::BadLun { .. })
        ));
        assert!(matches!(
            DeviceConfig::parse("lun=-1,initiator=h"),
            Err(CfgError::BadLun { .. })
        ));
        for bad in [
            "lun=0,initiator=",
            "lun=0,initiator=a b",
            "lun=0,initiator=h/x",
        ] {
            assert!(
                matches!(DeviceConfig::parse(bad), Err(CfgError::BadInitiator { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            DeviceConfig::parse("lun=0,initiator=h,lun=1"),
            Err(CfgError::Syntax { .. })
        ));
        assert!(matches!(
            DeviceConfig::parse("lun=0,initiator=h,junk"),
            Err(CfgError::Syntax { .. })
        ));
        assert!(DeviceConfig::parse("").is_err());
        let msg = DeviceConfig::parse("lun=0").unwrap_err().to_string();
        assert!(msg.contains("attrib/dev_config"), "{msg}");
    }

    #[test]
    fn scanning_a_fake_sysfs() {
        let dir = std::env::temp_dir().join(format!("stp-tcmu-scan-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let uio = dir.join("class/uio");
        for (n, name, size) in [
            (
                10,
                "tcm-user/1/b/stp/lun=1,initiator=h",
                "0x0000000040800000\n",
            ),
            (2, "tcm-user/1/a/stp/lun=0,initiator=h\n", "0x1000"),
            (3, "tcm-user/1/c/other/x", "0x1000"),
            (4, "something else", "0x1000"),
        ] {
            let d = uio.join(format!("uio{n}"));
            fs::create_dir_all(d.join("maps/map0")).unwrap();
            fs::write(d.join("name"), name).unwrap();
            fs::write(d.join("maps/map0/size"), size).unwrap();
        }
        fs::create_dir_all(uio.join("not-uio")).unwrap();
        let found = scan(&dir).unwrap();
        let names: Vec<(&str, &str)> = found
            .iter()
            .map(|f| (f.uio.as_str(), f.name.backstore.as_str()))
            .collect();
        assert_eq!(names, vec![("uio2", "a"), ("uio10", "b")]);
        assert_eq!(found[0].raw_name, "tcm-user/1/a/stp/lun=0,initiator=h");
        assert_eq!(map_size(&dir, "uio10").unwrap(), 0x4080_0000);
        assert_eq!(map_size(&dir, "uio2").unwrap(), 0x1000);
        fs::write(uio.join("uio2/maps/map0/size"), "junk").unwrap();
        assert!(map_size(&dir, "uio2").is_err());
        assert!(scan(&dir.join("nowhere")).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}

//! Builds QEMU's command line from a domain config, its disk chains and the
//! start options. Pure: no files are touched, so every argument is unit-tested.
//!
//! QEMU is started with `-daemonize` so it outlives the vmsnap command that
//! started it, and so that startup errors come back on stderr with a non-zero
//! exit status before vmsnap returns. Disks are given as JSON `-blockdev`
//! options (no comma-escaping pitfalls with odd paths), with every backing
//! link spelled out (see [`crate::disk`] for the node names). Every node
//! has `discard=unmap`, so clusters freed by the guest or by deleting a
//! snapshot become holes in the image files instead of staying allocated.

use std::collections::HashSet;
use std::path::Path;

use serde_json::{json, Value};

use crate::config::{Accel, DiskFormat, DomainConfig};
use crate::disk::{check_node_name, file_node_name, DiskChain};
use crate::error::{Error, Result};
use crate::state::DomainPaths;

/// The QEMU binary, overridable with `VMSNAP_QEMU` (a wrapper, another build).
pub fn qemu_binary() -> String {
    std::env::var("VMSNAP_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_string())
}

/// The chardev id of the monitor used under the domain lock.
pub const QMP_CHARDEV: &str = "vmsnap-qmp";
/// The chardev id of the monitor used by read-only queries.
pub const QUERY_CHARDEV: &str = "vmsnap-query";

/// How to start QEMU beyond what the config says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaunchOptions {
    /// Start with the vCPUs stopped (`-S`); `resume` (QMP `cont`) runs them.
    pub paused: bool,
    /// Wait for an incoming migration (`-incoming defer`) so a memory image
    /// can be fed with `migrate-incoming`, as reverting a snapshot does.
    pub incoming_defer: bool,
}

/// The full argument list (without the binary) for starting `config` with
/// the given disk chains, runtime files and options.
pub fn qemu_args(
    config: &DomainConfig,
    disks: &[DiskChain],
    paths: &DomainPaths,
    options: &LaunchOptions,
) -> Result<Vec<String>> {
    let invalid = |reason: String| Error::InvalidConfig {
        file: Path::new(&format!("(domain '{}')", config.name)).to_path_buf(),
        line: None,
        reason,
    };
    let mut args: Vec<String> = Vec::new();

    let accel = config.accel.resolved();
    add(&mut args, &["-name", &config.name]);
    if config.hugepages {
        // The backend keeps the id `pc.ram`, the RAM block name plain `-m`
        // gives, so memory images move between both kinds of domain.
        add(&mut args, &["-machine", "q35,memory-backend=pc.ram"]);
        add(
            &mut args,
            &[
                "-object",
                &format!(
                    "memory-backend-memfd,id=pc.ram,size={}M,hugetlb=on,hugetlbsize=2M,share=off,prealloc=on",
                    config.memory_mib
                ),
            ],
        );
    } else {
        add(&mut args, &["-machine", "q35"]);
    }
    add(&mut args, &["-accel", accel.as_str()]);
    if accel == Accel::Kvm {
        add(&mut args, &["-cpu", "host"]);
    }
    add(&mut args, &["-m", &format!("{}M", config.memory_mib)]);
    add(&mut args, &["-smp", &config.vcpus.to_string()]);
    add(
        &mut args,
        &["-nodefaults", "-display", "none", "-no-user-config"],
    );
    if let Some(firmware) = &config.firmware {
        add(
            &mut args,
            &["-bios", &utf8(firmware, "firmware").map_err(invalid)?],
        );
    }
    if let Some(kernel) = &config.kernel {
        add(
            &mut args,
            &["-kernel", &utf8(kernel, "kernel").map_err(invalid)?],
        );
    }
    if let Some(initrd) = &config.initrd {
        add(
            &mut args,
            &["-initrd", &utf8(initrd, "initrd").map_err(invalid)?],
        );
    }
    if let Some(cmdline) = &config.cmdline {
        add(&mut args, &["-append", cmdline]);
    }
    let serial = utf8(&paths.serial_log, "serial log").map_err(invalid)?;
    // `-serial file:` takes the rest of the string verbatim, commas included.
    add(&mut args, &["-serial", &format!("file:{serial}")]);
    for (id, socket) in [
        (QMP_CHARDEV, &paths.qmp_socket),
        (QUERY_CHARDEV, &paths.query_socket),
    ] {
        let socket = utf8(socket, "QMP socket").map_err(invalid)?;
        add(
            &mut args,
            &[
                "-chardev",
                &format!(
                    "socket,id={id},path={},server=on,wait=off",
                    escape_opt(&socket)
                ),
            ],
        );
        add(&mut args, &["-mon", &format!("chardev={id},mode=control")]);
    }
    add(
        &mut args,
        &[
            "-pidfile",
            &utf8(&paths.pid_file, "pid file").map_err(invalid)?,
        ],
    );
    add(&mut args, &["-daemonize"]);
    if options.paused {
        add(&mut args, &["-S"]);
    }
    if options.incoming_defer {
        add(&mut args, &["-incoming", "defer"]);
    }

    let mut targets = HashSet::new();
    let mut node_names = HashSet::new();
    for chain in disks {
        if !targets.insert(chain.target.as_str()) {
            return Err(invalid(format!(
                "disk {} appears twice in the disk chains",
                chain.target
            )));
        }
        let Some(active) = chain.active() else {
            return Err(invalid(format!(
                "disk {} has no image layers",
                chain.target
            )));
        };
        for layer in &chain.layers {
            check_node_name(&layer.node_name)
                .map_err(|why| invalid(format!("disk {}: {why}", chain.target)))?;
            if !node_names.insert(layer.node_name.as_str()) {
                return Err(invalid(format!(
                    "disk {}: node name '{}' is used twice in the domain",
                    chain.target, layer.node_name
                )));
            }
        }
        // Base first, so each layer's backing node exists when it is defined.
        for (depth, layer) in chain.layers.iter().enumerate().rev() {
            let backing = chain.layers.get(depth + 1).map(|l| l.node_name.as_str());
            let read_only = depth > 0;
            let filename = utf8(&layer.path, "image").map_err(invalid)?;
            let file_node = file_node_name(&layer.node_name);
            let mut protocol = json!({"driver": "file", "filename": filename, "node-name": file_node, "discard": "unmap"});
            let mut format = json!({"driver": layer.format.as_str(), "file": file_node, "node-name": layer.node_name, "discard": "unmap"});
            match (layer.format, backing) {
                (DiskFormat::Qcow2, backing) => {
                    format["backing"] =
                        backing.map_or(Value::Null, |b| Value::String(b.to_string()));
                }
                (DiskFormat::Raw, Some(_)) => {
                    return Err(invalid(format!(
                        "disk {}: raw image {} cannot have a backing layer",
                        chain.target,
                        layer.path.display()
                    )));
                }
                (DiskFormat::Raw, None) => {}
            }
            if read_only {
                protocol["read-only"] = Value::Bool(true);
                format["read-only"] = Value::Bool(true);
            }
            args.push("-blockdev".into());
            args.push(protocol.to_string());
            args.push("-blockdev".into());
            args.push(format.to_string());
        }
        args.push("-device".into());
        args.push(format!(
            "virtio-blk-pci,drive={},id={}",
            active.node_name, chain.target
        ));
    }
    args.extend(config.qemu_args.iter().cloned());
    Ok(args)
}

/// Appends literal arguments.
fn add(args: &mut Vec<String>, items: &[&str]) {
    args.extend(items.iter().map(|s| s.to_string()));
}

fn utf8(path: &Path, what: &str) -> std::result::Result<String, String> {
    path.to_str().map(str::to_string).ok_or_else(|| {
        format!(
            "{what} path {} is not UTF-8; QEMU's JSON options need UTF-8",
            path.display()
        )
    })
}

/// Escapes a value for QEMU's `key=value,...` option syntax (commas are doubled).
fn escape_opt(value: &str) -> String {
    value.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DiskLayer;
    use crate::state::StateDir;
    use std::path::PathBuf;

    fn config() -> DomainConfig {
        DomainConfig {
            name: "demo".into(),
            memory_mib: 256,
            hugepages: false,
            vcpus: 2,
            accel: Accel::Auto,
            kernel: Some("/g/vmlinuz".into()),
            initrd: Some("/g/initrd.img".into()),
            cmdline: Some("console=ttyS0 quiet".into()),
            firmware: None,
            qemu_args: vec![
                "-chardev".into(),
                "socket,id=ctl,path=/t/ctl.sock,server=on,wait=off".into(),
            ],
            disks: vec![],
        }
    }

    fn paths() -> DomainPaths {
        StateDir::open(Some(&std::env::temp_dir().join("vmsnap-cmdline-test,odd")))
            .unwrap()
            .domain_paths("demo")
    }

    #[test]
    fn full_command_line() {
        let paths = paths();
        let disks = vec![
            DiskChain::single("vda", "/img/a,b.qcow2".into(), DiskFormat::Qcow2),
            DiskChain::single("vdb", "/img/data.raw".into(), DiskFormat::Raw),
        ];
        let args = qemu_args(&config(), &disks, &paths, &LaunchOptions::default()).unwrap();
        let dir = paths.dir.to_str().unwrap();
        let edir = dir.replace(',', ",,");
        let expected: Vec<String> = [
            "-name", "demo", "-machine", "q35", "-accel", "tcg", "-m", "256M", "-smp", "2",
            "-nodefaults", "-display", "none", "-no-user-config",
            "-kernel", "/g/vmlinuz", "-initrd", "/g/initrd.img", "-append", "console=ttyS0 quiet",
            "-serial", &format!("file:{dir}/serial.log"),
            "-chardev", &format!("socket,id=vmsnap-qmp,path={edir}/qmp.sock,server=on,wait=off"),
            "-mon", "chardev=vmsnap-qmp,mode=control",
            "-chardev", &format!("socket,id=vmsnap-query,path={edir}/query.sock,server=on,wait=off"),
            "-mon", "chardev=vmsnap-query,mode=control",
            "-pidfile", &format!("{dir}/qemu.pid"),
            "-daemonize",
            "-blockdev", r#"{"driver":"file","filename":"/img/a,b.qcow2","node-name":"vmsnap-vda-file","discard":"unmap"}"#,
            "-blockdev", r#"{"backing":null,"driver":"qcow2","file":"vmsnap-vda-file","node-name":"vmsnap-vda","discard":"unmap"}"#,
            "-device", "virtio-blk-pci,drive=vmsnap-vda,id=vda",
            "-blockdev", r#"{"driver":"file","filename":"/img/data.raw","node-name":"vmsnap-vdb-file","discard":"unmap"}"#,
            "-blockdev", r#"{"driver":"raw","file":"vmsnap-vdb-file","node-name":"vmsnap-vdb","discard":"unmap"}"#,
            "-device", "virtio-blk-pci,drive=vmsnap-vdb,id=vdb",
            "-chardev", "socket,id=ctl,path=/t/ctl.sock,server=on,wait=off",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(normalized(&args), normalized(&expected));
    }

    /// JSON arguments compared as JSON, so key order does not matter.
    fn normalized(args: &[String]) -> Vec<Value> {
        args.iter()
            .map(|a| {
                if a.starts_with('{') {
                    serde_json::from_str(a).unwrap()
                } else {
                    Value::String(a.clone())
                }
            })
            .collect()
    }

    #[test]
    fn paused_incoming_kvm_and_firmware() {
        let mut config = config();
        config.accel = Accel::Kvm;
        config.kernel = None;
        config.initrd = None;
        config.cmdline = None;
        config.firmware = Some("/fw/OVMF.fd".into());
        let options = LaunchOptions {
            paused: true,
            incoming_defer: true,
        };
        let args = qemu_args(&config, &[], &paths(), &options).unwrap();
        let joined = args.join(" ");
        assert!(joined.contains("-accel kvm -cpu host"), "{joined}");
        assert!(joined.contains("-bios /fw/OVMF.fd"), "{joined}");
        assert!(!joined.contains("-kernel"), "{joined}");
        assert!(joined.contains("-daemonize -S -incoming defer"), "{joined}");
    }

    #[test]
    fn hugepage_memory_is_a_preallocated_hugetlb_backend_named_like_plain_ram() {
        let mut config = config();
        config.hugepages = true;
        let args = qemu_args(&config, &[], &paths(), &LaunchOptions::default()).unwrap();
        let joined = args.join(" ");
        assert!(
            joined.contains(
                "-machine q35,memory-backend=pc.ram -object memory-backend-memfd,id=pc.ram,size=256M,hugetlb=on,hugetlbsize=2M,share=off,prealloc=on"
            ),
            "{joined}"
        );
        assert!(joined.contains("-m 256M"), "{joined}");
        assert!(
            !qemu_args(&self::config(), &[], &paths(), &LaunchOptions::default())
                .unwrap()
                .join(" ")
                .contains("memory-backend")
        );
    }

    #[test]
    fn explicit_backing_chain_is_spelled_out_base_first() {
        let chain = DiskChain {
            target: "vda".into(),
            layers: vec![
                DiskLayer {
                    path: "/img/top.qcow2".into(),
                    format: DiskFormat::Qcow2,
                    node_name: "snap-2".into(),
                },
                DiskLayer {
                    path: "/img/mid.qcow2".into(),
                    format: DiskFormat::Qcow2,
                    node_name: "snap-1".into(),
                },
                DiskLayer {
                    path: "/img/base.raw".into(),
                    format: DiskFormat::Raw,
                    node_name: "vmsnap-vda".into(),
                },
            ],
        };
        let args = qemu_args(&config(), &[chain], &paths(), &LaunchOptions::default()).unwrap();
        let blockdevs: Vec<Value> = args
            .windows(2)
            .filter(|w| w[0] == "-blockdev")
            .map(|w| serde_json::from_str(&w[1]).unwrap())
            .collect();
        let formats: Vec<&Value> = blockdevs.iter().filter(|b| b["driver"] != "file").collect();
        assert_eq!(formats.len(), 3);
        assert_eq!(formats[0]["node-name"], "vmsnap-vda");
        assert_eq!(formats[0]["read-only"], true);
        assert_eq!(formats[1]["node-name"], "snap-1");
        assert_eq!(formats[1]["backing"], "vmsnap-vda");
        assert_eq!(formats[1]["read-only"], true);
        assert_eq!(formats[2]["node-name"], "snap-2");
        assert_eq!(formats[2]["backing"], "snap-1");
        assert!(formats[2].get("read-only").is_none());
        assert!(args.contains(&"virtio-blk-pci,drive=snap-2,id=vda".to_string()));
    }

    #[test]
    fn bad_chains_are_refused() {
        let base = DiskChain::single("vda", "/img/a.qcow2".into(), DiskFormat::Qcow2);
        let dup_target = vec![base.clone(), base.clone()];
        assert!(qemu_args(&config(), &dup_target, &paths(), &LaunchOptions::default()).is_err());
        let mut dup_node = DiskChain::single("vdb", "/img/b.qcow2".into(), DiskFormat::Qcow2);
        dup_node.layers[0].node_name = "vmsnap-vda".into();
        assert!(qemu_args(
            &config(),
            &[base.clone(), dup_node],
            &paths(),
            &LaunchOptions::default()
        )
        .is_err());
        let empty = DiskChain {
            target: "vdc".into(),
            layers: vec![],
        };
        assert!(qemu_args(&config(), &[empty], &paths(), &LaunchOptions::default()).is_err());
        let mut raw_on_top = base.clone();
        raw_on_top.layers.insert(
            0,
            DiskLayer {
                path: PathBuf::from("/img/top.raw"),
                format: DiskFormat::Raw,
                node_name: "top".into(),
            },
        );
        assert!(qemu_args(
            &config(),
            &[raw_on_top],
            &paths(),
            &LaunchOptions::default()
        )
        .is_err());
        let mut bad_name = base;
        bad_name.layers[0].node_name = "1-starts-with-digit".into();
        assert!(qemu_args(&config(), &[bad_name], &paths(), &LaunchOptions::default()).is_err());
    }
}

//! Compiles the eBPF C sources under `bpf/` with clang-14 into `OUT_DIR/probes.bpf.o` and
//! `OUT_DIR/offcpu.bpf.o`, which the loader embeds. Building needs no privileges; a missing
//! compiler or header is reported in one line that names the Debian packages to install.

use std::path::{Path, PathBuf};
use std::process::{Command, exit};

const CLANG: &str = "clang-14";
const INSTALL_HINT: &str = "apt-get install clang-14 libbpf-dev";
const SOURCES: &[&str] = &[
    "bpf/probes.bpf.c",
    "bpf/offcpu.bpf.c",
    "bpf/tracepoints.h",
    "bpf/shared.h",
];
/// (source, object in OUT_DIR)
const OBJECTS: &[(&str, &str)] = &[
    ("bpf/probes.bpf.c", "probes.bpf.o"),
    ("bpf/offcpu.bpf.c", "offcpu.bpf.o"),
];

fn fail(message: &str) -> ! {
    eprintln!("probes build: {message} (install with `{INSTALL_HINT}`)");
    exit(1);
}

fn main() {
    for source in SOURCES {
        println!("cargo:rerun-if-changed={source}");
    }
    println!("cargo:rerun-if-env-changed=PROBES_CLANG");
    let clang = std::env::var("PROBES_CLANG").unwrap_or_else(|_| CLANG.to_string());
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );

    for header in ["/usr/include/bpf/bpf_helpers.h", "/usr/include/linux/bpf.h"] {
        if !Path::new(header).is_file() {
            fail(&format!(
                "{header} is missing, needed to compile the eBPF programs"
            ));
        }
    }

    for (source, object) in OBJECTS {
        compile(
            &clang,
            &manifest.join(source),
            &out_dir.join(object),
            source,
        );
    }
}

fn compile(clang: &str, source: &Path, object: &Path, name: &str) {
    let output = Command::new(clang)
        .args([
            "-O2",
            "-g",
            "-target",
            "bpf",
            "-D__TARGET_ARCH_x86",
            "-I/usr/include/x86_64-linux-gnu",
            "-Wall",
            "-Werror",
            "-c",
        ])
        .arg(source)
        .arg("-o")
        .arg(object)
        .output();
    match output {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => fail(&format!(
            "{clang} not found, needed to compile the eBPF programs"
        )),
        Err(e) => fail(&format!("running {clang}: {e}")),
        Ok(out) if !out.status.success() => {
            // Compiler diagnostics are the useful part here; show them, then the one-line cause.
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
            eprintln!("probes build: {clang} failed to compile {name}");
            exit(1);
        }
        Ok(_) => {}
    }
}

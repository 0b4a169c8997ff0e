//! The tracepoint fields the eBPF programs read, and the check that the running kernel still
//! lays them out that way.
//!
//! The programs use hand-written context structs (`bpf/tracepoints.h`) rather than BTF-typed
//! ones, so a kernel that moved a field would make them read garbage silently. Before attaching
//! a probe the agent parses `/sys/kernel/tracing/events/CAT/EV/format` and compares every field
//! listed here (name, offset, size); a mismatch refuses that probe with a message naming the
//! field. The table mirrors the `TP_FIELD` lines of the header; a unit test keeps them equal.

use std::collections::BTreeMap;

/// One field a program reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub name: &'static str,
    pub offset: u32,
    pub size: u32,
    /// Older kernels lack it; the agent tells the program whether it exists.
    pub optional: bool,
}

/// A tracepoint and the fields read from it.
#[derive(Debug, Clone, Copy)]
pub struct Tracepoint {
    pub category: &'static str,
    pub name: &'static str,
    pub fields: &'static [Field],
}

impl Tracepoint {
    /// `category:name`, as `perf` and bpftrace spell it.
    pub fn id(&self) -> String {
        format!("{}:{}", self.category, self.name)
    }
}

const fn f(name: &'static str, offset: u32, size: u32) -> Field {
    Field {
        name,
        offset,
        size,
        optional: false,
    }
}

const fn opt(name: &'static str, offset: u32, size: u32) -> Field {
    Field {
        name,
        offset,
        size,
        optional: true,
    }
}

pub const TCP_RETRANSMIT_SKB: Tracepoint = Tracepoint {
    category: "tcp",
    name: "tcp_retransmit_skb",
    fields: &[
        f("skbaddr", 8, 8),
        f("skaddr", 16, 8),
        f("state", 24, 4),
        f("sport", 28, 2),
        f("dport", 30, 2),
        f("family", 32, 2),
        f("saddr", 34, 4),
        f("daddr", 38, 4),
        f("saddr_v6", 42, 16),
        f("daddr_v6", 58, 16),
        opt("err", 76, 4),
    ],
};

pub const INET_SOCK_SET_STATE: Tracepoint = Tracepoint {
    category: "sock",
    name: "inet_sock_set_state",
    fields: &[
        f("skaddr", 8, 8),
        f("oldstate", 16, 4),
        f("newstate", 20, 4),
        f("sport", 24, 2),
        f("dport", 26, 2),
        f("family", 28, 2),
        f("protocol", 30, 2),
        f("saddr", 32, 4),
        f("daddr", 36, 4),
        f("saddr_v6", 40, 16),
        f("daddr_v6", 56, 16),
    ],
};

pub const TCP_RECEIVE_RESET: Tracepoint = Tracepoint {
    category: "tcp",
    name: "tcp_receive_reset",
    fields: &[
        f("skaddr", 8, 8),
        f("sport", 16, 2),
        f("dport", 18, 2),
        f("family", 20, 2),
        f("saddr", 22, 4),
        f("daddr", 26, 4),
        f("saddr_v6", 30, 16),
        f("daddr_v6", 46, 16),
    ],
};

pub const TCP_SEND_RESET: Tracepoint = Tracepoint {
    category: "tcp",
    name: "tcp_send_reset",
    fields: &[
        f("skaddr", 16, 8),
        f("state", 24, 4),
        f("saddr", 32, 28),
        f("daddr", 60, 28),
    ],
};

pub const SCHED_WAKEUP: Tracepoint = Tracepoint {
    category: "sched",
    name: "sched_wakeup",
    fields: &[f("pid", 24, 4)],
};

pub const SCHED_WAKEUP_NEW: Tracepoint = Tracepoint {
    category: "sched",
    name: "sched_wakeup_new",
    fields: &[f("pid", 24, 4)],
};

pub const SCHED_SWITCH: Tracepoint = Tracepoint {
    category: "sched",
    name: "sched_switch",
    fields: &[
        f("prev_pid", 24, 4),
        f("prev_state", 32, 8),
        f("next_pid", 56, 4),
    ],
};

pub const BLOCK_RQ_ISSUE: Tracepoint = Tracepoint {
    category: "block",
    name: "block_rq_issue",
    fields: &[
        f("dev", 8, 4),
        f("sector", 16, 8),
        f("bytes", 28, 4),
        f("rwbs", 34, 10),
    ],
};

pub const BLOCK_RQ_COMPLETE: Tracepoint = Tracepoint {
    category: "block",
    name: "block_rq_complete",
    fields: &[
        f("dev", 8, 4),
        f("sector", 16, 8),
        f("error", 28, 4),
        f("rwbs", 34, 10),
    ],
};

pub const MARK_VICTIM: Tracepoint = Tracepoint {
    category: "oom",
    name: "mark_victim",
    fields: &[
        f("pid", 8, 4),
        f("comm", 12, 4),
        f("total_vm", 16, 8),
        f("anon_rss", 24, 8),
        f("file_rss", 32, 8),
        f("shmem_rss", 40, 8),
        f("uid", 48, 4),
        f("pgtables", 56, 8),
        f("oom_score_adj", 64, 2),
    ],
};

/// Every tracepoint any probe uses.
pub const ALL: &[Tracepoint] = &[
    TCP_RETRANSMIT_SKB,
    INET_SOCK_SET_STATE,
    TCP_RECEIVE_RESET,
    TCP_SEND_RESET,
    SCHED_WAKEUP,
    SCHED_WAKEUP_NEW,
    SCHED_SWITCH,
    BLOCK_RQ_ISSUE,
    BLOCK_RQ_COMPLETE,
    MARK_VICTIM,
];

/// A field as a format file declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatField {
    pub decl: String,
    pub offset: u32,
    pub size: u32,
}

/// The fields of a `format` file, by name (`saddr[4]` is `saddr`, `__data_loc char[] comm` is
/// `comm`).
pub fn parse_format(text: &str) -> BTreeMap<String, FormatField> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut parts = rest.split(';').map(str::trim);
        let Some(decl) = parts.next() else { continue };
        let mut offset = None;
        let mut size = None;
        for p in parts {
            if let Some(v) = p.strip_prefix("offset:") {
                offset = v.parse().ok();
            } else if let Some(v) = p.strip_prefix("size:") {
                size = v.parse().ok();
            }
        }
        let (Some(offset), Some(size)) = (offset, size) else {
            continue;
        };
        let Some(last) = decl.split_whitespace().last() else {
            continue;
        };
        let name = last.split('[').next().unwrap_or(last).to_string();
        out.insert(
            name,
            FormatField {
                decl: decl.to_string(),
                offset,
                size,
            },
        );
    }
    out
}

/// How a kernel's layout differs from the one the programs were compiled for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("{tracepoint}: field `{field}` is missing from the kernel's format file")]
    Missing { tracepoint: String, field: String },
    #[error(
        "{tracepoint}: field `{field}` is at offset {found_offset} size {found_size} in this kernel, the program expects offset {offset} size {size}"
    )]
    Moved {
        tracepoint: String,
        field: String,
        offset: u32,
        size: u32,
        found_offset: u32,
        found_size: u32,
    },
}

/// What a successful check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayoutOk {
    /// Optional fields this kernel lacks.
    pub absent_optional: Vec<&'static str>,
}

/// Compares `tp`'s expected fields with the kernel's `format` text.
pub fn verify(tp: &Tracepoint, format: &str) -> Result<LayoutOk, LayoutError> {
    let fields = parse_format(format);
    let mut ok = LayoutOk::default();
    for want in tp.fields {
        match fields.get(want.name) {
            None if want.optional => ok.absent_optional.push(want.name),
            None => {
                return Err(LayoutError::Missing {
                    tracepoint: tp.id(),
                    field: want.name.to_string(),
                });
            }
            Some(have) if have.offset != want.offset || have.size != want.size => {
                return Err(LayoutError::Moved {
                    tracepoint: tp.id(),
                    field: want.name.to_string(),
                    offset: want.offset,
                    size: want.size,
                    found_offset: have.offset,
                    found_size: have.size,
                });
            }
            Some(_) => {}
        }
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETRANSMIT_FORMAT: &str = "name: tcp_retransmit_skb
ID: 1575
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:32;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:34;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:38;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:42;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:58;\tsize:16;\tsigned:0;
\tfield:int err;\toffset:76;\tsize:4;\tsigned:1;

print fmt: \"skbaddr=%p\"
";

    #[test]
    fn parses_names_offsets_and_sizes() {
        let f = parse_format(RETRANSMIT_FORMAT);
        assert_eq!(f["saddr_v6"].offset, 42);
        assert_eq!(f["saddr_v6"].size, 16);
        assert_eq!(f["common_pid"].offset, 4);
        let oom = parse_format("\tfield:__data_loc char[] comm;\toffset:12;\tsize:4;\tsigned:0;");
        assert_eq!(oom["comm"].offset, 12);
    }

    #[test]
    fn a_matching_layout_passes_and_notes_absent_optional_fields() {
        assert_eq!(
            verify(&TCP_RETRANSMIT_SKB, RETRANSMIT_FORMAT),
            Ok(LayoutOk::default())
        );
        let old_kernel =
            RETRANSMIT_FORMAT.replace("\tfield:int err;\toffset:76;\tsize:4;\tsigned:1;\n", "");
        assert_eq!(
            verify(&TCP_RETRANSMIT_SKB, &old_kernel),
            Ok(LayoutOk {
                absent_optional: vec!["err"]
            })
        );
    }

    #[test]
    fn a_moved_or_missing_field_is_named() {
        let moved = RETRANSMIT_FORMAT.replace("int state;\toffset:24", "int state;\toffset:20");
        let e = verify(&TCP_RETRANSMIT_SKB, &moved).unwrap_err();
        assert_eq!(
            e.to_string(),
            "tcp:tcp_retransmit_skb: field `state` is at offset 20 size 4 in this kernel, the program expects offset 24 size 4"
        );
        let missing = RETRANSMIT_FORMAT.replace("__u16 family", "__u16 fam");
        let e = verify(&TCP_RETRANSMIT_SKB, &missing).unwrap_err();
        assert!(e.to_string().contains("`family` is missing"), "{e}");
    }

    /// The table above and the `TP_FIELD` lines of bpf/tracepoints.h must agree.
    #[test]
    fn table_matches_the_c_header() {
        let header = include_str!("../bpf/tracepoints.h");
        let mut from_c = Vec::new();
        for line in header.lines() {
            let line = line.trim();
            let (optional, rest) = if let Some(r) = line.strip_prefix("TP_FIELD_OPT(") {
                (true, r)
            } else if let Some(r) = line.strip_prefix("TP_FIELD(") {
                (false, r)
            } else {
                continue;
            };
            let args: Vec<&str> = rest
                .trim_end_matches(')')
                .split(',')
                .map(str::trim)
                .collect();
            assert_eq!(args.len(), 5, "{line}");
            from_c.push((
                format!("{}:{}", args[0], args[1]),
                args[2].to_string(),
                args[3].parse::<u32>().unwrap(),
                args[4].parse::<u32>().unwrap(),
                optional,
            ));
        }
        let from_rust: Vec<_> = ALL
            .iter()
            .flat_map(|tp| {
                tp.fields
                    .iter()
                    .map(move |f| (tp.id(), f.name.to_string(), f.offset, f.size, f.optional))
            })
            .collect();
        let mut a = from_c.clone();
        let mut b = from_rust.clone();
        a.sort();
        b.sort();
        assert_eq!(a, b);
    }
}

//! Reads one thing from the kernel's BTF (`/sys/kernel/btf/vmlinux`): the value of an
//! enumerator by name. CO-RE relocates enum values only for named enums, and some the programs
//! need live in anonymous ones (`QUEUE_FLAG_STATS`); the agent looks them up here and hands
//! them to the programs as load-time constants.
//!
//! The format (Documentation/bpf/btf.rst): a header, then a type section of records of 12
//! bytes (`name_off`, `info`, `size_or_type`) each followed by kind-specific data, then a
//! string section.

const MAGIC: u16 = 0xeb9f;
const KIND_ENUM: u32 = 6;
const KIND_ENUM64: u32 = 19;

/// Bytes that follow a type record of `kind` with `vlen` members, `None` for an unknown kind.
fn trailing(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        // INT: one u32 of encoding; VAR: one u32 of linkage; DECL_TAG: one u32 of component.
        1 | 14 | 17 => 4,
        // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG.
        2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
        // ARRAY: element type, index type, count.
        3 => 12,
        // STRUCT, UNION, DATASEC: 12 bytes per member / variable.
        4 | 5 | 15 => 12 * vlen,
        // ENUM and FUNC_PROTO: 8 bytes per enumerator / parameter.
        KIND_ENUM | 13 => 8 * vlen,
        // ENUM64: name, low and high 32 bits of the value.
        KIND_ENUM64 => 12 * vlen,
        _ => return None,
    })
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn str_at(strings: &[u8], off: u32) -> Option<&[u8]> {
    let s = strings.get(off as usize..)?;
    Some(&s[..s.iter().position(|&c| c == 0)?])
}

/// The value of the enumerator `name` in a BTF blob (native endianness), the first one found;
/// `None` when it is not there or the blob is not BTF.
pub fn enumerator_value(btf: &[u8], name: &str) -> Option<i64> {
    if u16::from_ne_bytes(btf.get(0..2)?.try_into().ok()?) != MAGIC {
        return None;
    }
    let hdr_len = u32_at(btf, 4)? as usize;
    let (type_off, type_len) = (u32_at(btf, 8)? as usize, u32_at(btf, 12)? as usize);
    let (str_off, str_len) = (u32_at(btf, 16)? as usize, u32_at(btf, 20)? as usize);
    let types = btf.get(hdr_len + type_off..hdr_len + type_off + type_len)?;
    let strings = btf.get(hdr_len + str_off..hdr_len + str_off + str_len)?;
    let mut at = 0;
    while at + 12 <= types.len() {
        let info = u32_at(types, at + 4)?;
        let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
        let body = at + 12;
        if kind == KIND_ENUM || kind == KIND_ENUM64 {
            let step = trailing(kind, 1)?;
            for i in 0..vlen {
                let e = body + i * step;
                if str_at(strings, u32_at(types, e)?)? == name.as_bytes() {
                    let lo = u32_at(types, e + 4)?;
                    return Some(if kind == KIND_ENUM {
                        i64::from(lo as i32)
                    } else {
                        (i64::from(u32_at(types, e + 8)?) << 32) | i64::from(lo)
                    });
                }
            }
        }
        at = body + trailing(kind, vlen)?;
    }
    None
}

/// [`enumerator_value`] in the running kernel's BTF, `None` without it.
pub fn kernel_enumerator(name: &str) -> Option<i64> {
    enumerator_value(&std::fs::read(crate::kernel::BTF_PATH).ok()?, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: an INT, a STRUCT with one member, then an anonymous ENUM with two
    /// enumerators.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0s\0m\0A\0B\0".to_vec(); // int@1 s@5 m@7 A@9 B@11
        let mut types = Vec::new();
        let mut rec = |name: u32, kind: u32, vlen: u32, size: u32, extra: &[u32]| {
            for v in [name, (kind << 24) | vlen, size].iter().chain(extra) {
                types.extend_from_slice(&v.to_ne_bytes());
            }
        };
        rec(1, 1, 0, 4, &[32]);
        rec(5, 4, 1, 4, &[7, 1, 0]);
        rec(0, KIND_ENUM, 2, 4, &[9, 3, 11, (-2i32) as u32]);
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_ne_bytes());
        b.extend_from_slice(&[1, 0]);
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        b.extend_from_slice(&types);
        b.extend_from_slice(&strings);
        b
    }

    #[test]
    fn finds_enumerators_of_anonymous_enums_after_other_kinds() {
        let b = blob();
        assert_eq!(enumerator_value(&b, "A"), Some(3));
        assert_eq!(enumerator_value(&b, "B"), Some(-2));
        assert_eq!(enumerator_value(&b, "C"), None);
        // A member's name is not an enumerator.
        assert_eq!(enumerator_value(&b, "m"), None);
    }

    #[test]
    fn bad_input_is_none_not_a_panic() {
        let b = blob();
        assert_eq!(enumerator_value(&[], "A"), None);
        let mut wrong_magic = b.clone();
        wrong_magic[0] ^= 0xff;
        assert_eq!(enumerator_value(&wrong_magic, "A"), None);
        // Cut anywhere: the string or type section is short, never a panic.
        for cut in 0..b.len() {
            assert_eq!(enumerator_value(&b[..cut], "B"), None, "cut at {cut}");
        }
    }

    #[test]
    fn reads_the_running_kernels_btf() {
        if !std::path::Path::new(crate::kernel::BTF_PATH).is_file() {
            println!("SKIPPED reads_the_running_kernels_btf: no /sys/kernel/btf/vmlinux");
            return;
        }
        // TCP_CLOSE = 7 since Linux 2.x, in an enum the kernel's BTF always has.
        assert_eq!(kernel_enumerator("TCP_CLOSE"), Some(7));
        let bit = kernel_enumerator("QUEUE_FLAG_STATS");
        println!("QUEUE_FLAG_STATS = {bit:?}");
        assert!(bit.is_none_or(|b| (0..64).contains(&b)), "{bit:?}");
    }
}

//! Wire-identity check: `proto/csi.proto` (our hand-written CSI v1.12.0 definition) must
//! compile to the same descriptor as the upstream reference
//! `../shared/reference/csi-spec/csi.proto`, ignoring only source info (comments, spans).
//!
//! Two checks run:
//! 1. the `prost_types::FileDescriptorProto`s are compared structurally (package, imports,
//!    messages with nested types / fields / oneofs, enums, services, extensions, file options);
//! 2. the encoded descriptors are compared byte for byte, which additionally covers the custom
//!    `csi_secret` / `alpha_*` extension options (prost-types drops extension values on decode).

use std::fmt::Debug;
use std::path::{Path, PathBuf};

use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorProto, FileDescriptorSet};
use protox::prost_reflect::{DescriptorPool, DynamicMessage};

#[path = "common/shared.rs"]
mod shared;

const FILE: &str = "csi.proto";

struct Compiled {
    proto: FileDescriptorProto,
    encoded: Vec<u8>,
    pool: DescriptorPool,
}

/// Compile `<include_dir>/csi.proto` (with `include_dir` as its only include path; the
/// google/protobuf imports are bundled by protox) without source info.
fn compile(include_dir: &Path) -> Compiled {
    let path = include_dir.join(FILE);
    assert!(path.is_file(), "proto file not found: {}", path.display());
    let mut compiler = protox::Compiler::new([include_dir])
        .unwrap_or_else(|e| panic!("protox include dir {}: {e}", include_dir.display()));
    compiler.include_imports(false).include_source_info(false);
    compiler
        .open_file(FILE)
        .unwrap_or_else(|e| panic!("protox failed to compile {}: {e:?}", path.display()));

    let FileDescriptorSet { file } = compiler.file_descriptor_set();
    assert_eq!(
        file.len(),
        1,
        "expected exactly one file descriptor for {}",
        path.display()
    );
    let mut proto = file.into_iter().next().unwrap();
    proto.source_code_info = None;
    proto.name = Some(FILE.to_string());

    Compiled {
        proto,
        encoded: compiler.encode_file_descriptor_set(),
        pool: compiler.descriptor_pool(),
    }
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The reference's directory, or None (after a notice) in a clone without `../shared`.
fn reference_dir() -> Option<PathBuf> {
    let file = shared::path(
        &format!("reference/csi-spec/{FILE}"),
        "csi_proto_is_wire_identical_to_reference",
    )?;
    Some(file.parent().expect("a file has a directory").to_owned())
}

// ------------------------------------------------------------------ structural diff

fn cmp<T: PartialEq + Debug>(out: &mut Vec<String>, what: &str, reference: &T, ours: &T) {
    if reference != ours {
        out.push(format!(
            "{what}:\n    reference: {reference:?}\n    ours:      {ours:?}"
        ));
    }
}

fn names<T>(items: &[T], name: impl Fn(&T) -> &str) -> Vec<String> {
    items.iter().map(|i| name(i).to_string()).collect()
}

fn diff_enum(out: &mut Vec<String>, scope: &str, r: &EnumDescriptorProto, o: &EnumDescriptorProto) {
    let scope = format!("{scope}.{}", r.name());
    cmp(
        out,
        &format!("enum {scope}: options"),
        &r.options,
        &o.options,
    );
    cmp(
        out,
        &format!("enum {scope}: value names"),
        &names(&r.value, |v| v.name()),
        &names(&o.value, |v| v.name()),
    );
    for (rv, ov) in r.value.iter().zip(&o.value) {
        cmp(out, &format!("enum value {scope}.{}", rv.name()), rv, ov);
    }
    cmp(
        out,
        &format!("enum {scope}: reserved ranges"),
        &r.reserved_range,
        &o.reserved_range,
    );
    cmp(
        out,
        &format!("enum {scope}: reserved names"),
        &r.reserved_name,
        &o.reserved_name,
    );
}

fn diff_message(out: &mut Vec<String>, scope: &str, r: &DescriptorProto, o: &DescriptorProto) {
    let scope = format!("{scope}.{}", r.name());
    cmp(
        out,
        &format!("message {scope}: options"),
        &r.options,
        &o.options,
    );
    cmp(
        out,
        &format!("message {scope}: field names"),
        &names(&r.field, |f| f.name()),
        &names(&o.field, |f| f.name()),
    );
    for (rf, of) in r.field.iter().zip(&o.field) {
        cmp(out, &format!("field {scope}.{}", rf.name()), rf, of);
    }
    cmp(
        out,
        &format!("message {scope}: oneofs"),
        &r.oneof_decl,
        &o.oneof_decl,
    );
    cmp(
        out,
        &format!("message {scope}: extensions"),
        &r.extension,
        &o.extension,
    );
    cmp(
        out,
        &format!("message {scope}: extension ranges"),
        &r.extension_range,
        &o.extension_range,
    );
    cmp(
        out,
        &format!("message {scope}: reserved ranges"),
        &r.reserved_range,
        &o.reserved_range,
    );
    cmp(
        out,
        &format!("message {scope}: reserved names"),
        &r.reserved_name,
        &o.reserved_name,
    );
    cmp(
        out,
        &format!("message {scope}: nested message names"),
        &names(&r.nested_type, |m| m.name()),
        &names(&o.nested_type, |m| m.name()),
    );
    for (rm, om) in r.nested_type.iter().zip(&o.nested_type) {
        diff_message(out, &scope, rm, om);
    }
    cmp(
        out,
        &format!("message {scope}: nested enum names"),
        &names(&r.enum_type, |e| e.name()),
        &names(&o.enum_type, |e| e.name()),
    );
    for (re, oe) in r.enum_type.iter().zip(&o.enum_type) {
        diff_enum(out, &scope, re, oe);
    }
}

fn structural_diff(r: &FileDescriptorProto, o: &FileDescriptorProto) -> Vec<String> {
    let mut out = Vec::new();
    cmp(&mut out, "package", &r.package, &o.package);
    cmp(&mut out, "syntax", &r.syntax, &o.syntax);
    cmp(
        &mut out,
        "imports (dependency)",
        &r.dependency,
        &o.dependency,
    );
    cmp(
        &mut out,
        "public imports",
        &r.public_dependency,
        &o.public_dependency,
    );
    cmp(
        &mut out,
        "weak imports",
        &r.weak_dependency,
        &o.weak_dependency,
    );
    cmp(&mut out, "file options", &r.options, &o.options);
    cmp(
        &mut out,
        "file-level extensions",
        &r.extension,
        &o.extension,
    );

    let scope = format!(".{}", r.package());
    cmp(
        &mut out,
        "top-level message names",
        &names(&r.message_type, |m| m.name()),
        &names(&o.message_type, |m| m.name()),
    );
    for (rm, om) in r.message_type.iter().zip(&o.message_type) {
        diff_message(&mut out, &scope, rm, om);
    }
    cmp(
        &mut out,
        "top-level enum names",
        &names(&r.enum_type, |e| e.name()),
        &names(&o.enum_type, |e| e.name()),
    );
    for (re, oe) in r.enum_type.iter().zip(&o.enum_type) {
        diff_enum(&mut out, &scope, re, oe);
    }

    cmp(
        &mut out,
        "service names",
        &names(&r.service, |s| s.name()),
        &names(&o.service, |s| s.name()),
    );
    for (rs, os) in r.service.iter().zip(&o.service) {
        let svc = format!("{scope}.{}", rs.name());
        cmp(
            &mut out,
            &format!("service {svc}: options"),
            &rs.options,
            &os.options,
        );
        cmp(
            &mut out,
            &format!("service {svc}: method names"),
            &names(&rs.method, |m| m.name()),
            &names(&os.method, |m| m.name()),
        );
        for (rmeth, ometh) in rs.method.iter().zip(&os.method) {
            cmp(
                &mut out,
                &format!("rpc {svc}.{}", rmeth.name()),
                rmeth,
                ometh,
            );
        }
    }
    out
}

// ------------------------------------------------------------------ text diff (with options)

/// Render an encoded single-file `FileDescriptorSet` as protobuf text, resolving the custom
/// extension options through the compiler's own descriptor pool.
fn to_text(c: &Compiled) -> String {
    let desc = c
        .pool
        .get_message_by_name("google.protobuf.FileDescriptorSet")
        .expect("descriptor.proto is imported, so FileDescriptorSet is in the pool");
    let msg =
        DynamicMessage::decode(desc, c.encoded.as_slice()).expect("decode encoded descriptor set");
    format!("{msg:#}")
}

fn first_text_difference(reference: &str, ours: &str) -> String {
    let (r, o): (Vec<&str>, Vec<&str>) = (reference.lines().collect(), ours.lines().collect());
    let idx = r
        .iter()
        .zip(&o)
        .position(|(a, b)| a != b)
        .unwrap_or(r.len().min(o.len()));
    let start = idx.saturating_sub(12);
    let ctx = r[start..idx].join("\n");
    format!(
        "first difference at descriptor text line {}:\n--- context (both) ---\n{ctx}\n--- reference ---\n{}\n--- ours ---\n{}",
        idx + 1,
        r.get(idx..(idx + 4).min(r.len()))
            .map(|s| s.join("\n"))
            .unwrap_or_default(),
        o.get(idx..(idx + 4).min(o.len()))
            .map(|s| s.join("\n"))
            .unwrap_or_default(),
    )
}

// ------------------------------------------------------------------ test

#[test]
fn csi_proto_is_wire_identical_to_reference() {
    let Some(reference) = reference_dir() else {
        return;
    };
    let reference = compile(&reference);
    let ours = compile(&manifest_dir().join("proto"));

    // Sanity: the comparison really sees the content (guards against comparing two empties).
    assert_eq!(reference.proto.package(), "csi.v1");
    assert!(
        reference.proto.message_type.len() > 50,
        "reference has suspiciously few messages"
    );
    assert_eq!(
        reference.proto.service.len(),
        5,
        "reference should declare 5 services"
    );
    assert!(
        to_text(&reference).contains("[csi.v1.csi_secret]: true"),
        "reference descriptor text lacks csi_secret options; the option check would be vacuous"
    );

    let diffs = structural_diff(&reference.proto, &ours.proto);
    if !diffs.is_empty() {
        panic!(
            "proto/csi.proto differs from the CSI reference in {} place(s):\n{}",
            diffs.len(),
            diffs.join("\n")
        );
    }
    // Catch-all for anything the walk above does not name explicitly.
    assert_eq!(reference.proto, ours.proto, "FileDescriptorProto mismatch");

    // Byte-exact comparison, which also covers extension options (csi_secret, alpha_*).
    if reference.encoded != ours.encoded {
        panic!(
            "encoded descriptors differ (likely a custom option such as csi_secret / alpha_*):\n{}",
            first_text_difference(&to_text(&reference), &to_text(&ours))
        );
    }
}

/// A fresh clone has no `../shared`: the comparison says so and skips, but under CI it
/// fails. Runs this very test binary again with the reference pointed at nothing.
#[test]
fn without_shared_the_comparison_skips_except_under_ci() {
    let run = |ci: Option<&str>| {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "csi_proto_is_wire_identical_to_reference",
            "--nocapture",
        ])
        .env("BERTH_SHARED_DIR", "/nonexistent/berth-shared");
        match ci {
            Some(v) => cmd.env("CI", v),
            None => cmd.env_remove("CI"),
        };
        let out = cmd.output().expect("run the test binary");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stderr) = run(None);
    assert!(
        ok,
        "outside CI a clone without shared/ must pass:\n{stderr}"
    );
    assert!(
        stderr.contains("skipping"),
        "it must say it skipped:\n{stderr}"
    );
    let (ok, stderr) = run(Some("true"));
    assert!(!ok, "under CI=true a missing shared/ must fail:\n{stderr}");
    assert!(stderr.contains("CI is set"), "{stderr}");
}

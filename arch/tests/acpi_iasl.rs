//! Disassembles every ACPI table [`arch::acpi::AcpiTables`] builds with the real `iasl` from
//! ACPICA (Debian `acpica-tools`, installed by `ci/install-deps.sh`) and checks that ACPICA
//! reads what we meant to write: no errors or warnings, the processors, the MCFG window and the
//! PCI host bridge with its resources.
//!
//! A missing `iasl` fails the test: CI installs it, so its absence is a broken setup, not a
//! reason to skip.

use std::path::Path;
use std::process::Command;

use arch::acpi::{AcpiTables, PlatformDescription};
use arch::layout;

/// Runs `iasl -d` on `table` written as `<dir>/<name>.dat` and returns the `.dsl` text.
fn disassemble(dir: &Path, name: &str, table: &[u8]) -> String {
    let input = dir.join(format!("{name}.dat"));
    std::fs::write(&input, table).unwrap();
    let output = match Command::new("iasl")
        .arg("-d")
        .arg(&input)
        .current_dir(dir)
        .output()
    {
        Ok(output) => output,
        Err(e) => panic!(
            "cannot run iasl ({e}): install the Debian package acpica-tools \
             (ci/install-deps.sh does)"
        ),
    };
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "iasl -d {name} failed:\n{log}");
    for bad in ["error", "warning", "incorrect", "invalid"] {
        assert!(
            !log.to_lowercase().contains(bad),
            "iasl -d {name} reported a problem ({bad}):\n{log}"
        );
    }
    let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl")))
        .unwrap_or_else(|e| panic!("iasl wrote no {name}.dsl ({e}):\n{log}"));
    for bad in ["**** ", "Unknown", "Invalid"] {
        assert!(!dsl.contains(bad), "{name}.dsl has {bad:?}:\n{dsl}");
    }
    dsl
}

/// The values iasl prints for field `label` (`[offset width] Label : value`, or
/// `Label   N : value` for the N-th of a list), trimmed, in table order.
fn field<'a>(dsl: &'a str, label: &str) -> Vec<&'a str> {
    dsl.lines()
        .filter_map(|line| {
            let (left, value) = line.split_once(" : ")?;
            let name = left.rsplit(']').next()?.trim();
            let indexed = name
                .strip_prefix(label)
                .is_some_and(|rest| rest.trim().parse::<u32>().is_ok());
            (name == label || indexed).then(|| value.trim())
        })
        .collect()
}

fn hex(value: u64, digits: usize) -> String {
    format!("{value:0digits$X}")
}

#[test]
fn iasl_disassembles_every_table_without_complaint() {
    let vcpus = 3;
    let platform = PlatformDescription::new(vcpus, 1 << 30);
    let tables = AcpiTables::build(&platform).unwrap();
    let dir = tempfile::tempdir().unwrap();

    let mut dsl = std::collections::HashMap::new();
    // iasl (20200925, Debian 12) cannot take an RSDP on its own ("Binary file does not
    // contain a valid ACPI table": it has no standard header); its bytes are checked below
    // and in the unit tests, every table it points to is disassembled.
    for placement in tables.tables().iter().filter(|t| &t.signature != b"RSDP") {
        let name = std::str::from_utf8(&placement.signature)
            .unwrap()
            .to_owned();
        let table = tables.table(&placement.signature).unwrap();
        dsl.insert(name.clone(), disassemble(dir.path(), &name, table));
    }

    // RSDP -> XSDT, XSDT -> FACP, APIC, MCFG; FACP -> DSDT, at the addresses we placed them.
    let address = |signature: &[u8; 4]| tables.address_of(signature).unwrap().0;
    let rsdp = tables.table(b"RSDP").unwrap();
    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    assert_eq!(rsdp.iter().fold(0u8, |sum, &b| sum.wrapping_add(b)), 0);
    assert_eq!(rsdp[24..32], address(b"XSDT").to_le_bytes());
    let xsdt_entries: Vec<String> = [b"FACP", b"APIC", b"MCFG"]
        .iter()
        .map(|s| hex(address(s), 16))
        .collect();
    assert_eq!(field(&dsl["XSDT"], "ACPI Table Address"), xsdt_entries);
    // The 32-bit pointer stays zero, X_DSDT carries the address.
    assert_eq!(
        field(&dsl["FACP"], "DSDT Address"),
        ["00000000".to_owned(), hex(address(b"DSDT"), 16)]
    );
    assert_eq!(
        field(&dsl["FACP"], "Hardware Reduced (V5)"),
        ["1"],
        "{}",
        dsl["FACP"]
    );

    // MADT: one enabled processor per vCPU, then the IOAPIC.
    let madt = &dsl["APIC"];
    let processors = field(madt, "Local Apic ID");
    assert_eq!(processors, ["00", "01", "02"], "{madt}");
    assert_eq!(field(madt, "Processor Enabled"), ["1"; 3]);
    assert_eq!(
        field(madt, "Address"),
        [hex(layout::IOAPIC_START.0, 8)],
        "{madt}"
    );
    assert_eq!(
        field(madt, "Local Apic Address"),
        [hex(layout::LAPIC_START.0, 8)]
    );

    // MCFG: the ECAM window, segment 0, bus 0 only.
    let mcfg = &dsl["MCFG"];
    assert_eq!(
        field(mcfg, "Base Address"),
        [hex(layout::PCI_ECAM_START.0, 16)],
        "{mcfg}"
    );
    assert_eq!(field(mcfg, "Segment Group Number"), ["0000"]);
    assert_eq!(field(mcfg, "Start Bus Number"), ["00"]);
    assert_eq!(field(mcfg, "End Bus Number"), ["00"]);

    // DSDT: the host bridge and its resources, the serial port, the GED and power button.
    let dsdt = &dsl["DSDT"];
    let text = dsdt.to_uppercase();
    for expected in [
        "DEVICE (_SB.PCI0)".to_owned(),
        "EISAID (\"PNP0A08\")".to_owned(),
        "EISAID (\"PNP0A03\")".to_owned(),
        "WORDBUSNUMBER".to_owned(),
        // The configuration ports, the ECAM window, the two BAR windows.
        "0X0CF8,             // RANGE MINIMUM".to_owned(),
        format!(
            "0X{:08X},         // ADDRESS BASE",
            layout::PCI_ECAM_START.0
        ),
        format!(
            "0X{:08X},         // RANGE MINIMUM",
            layout::PCI_MMIO32_START.0
        ),
        format!("0X{:016X}, // RANGE MINIMUM", platform.mmio64.0 .0),
        "DEVICE (_SB.COM1)".to_owned(),
        "EISAID (\"PNP0501\")".to_owned(),
        "0X03F8,             // RANGE MINIMUM".to_owned(),
        "DEVICE (_SB.GED)".to_owned(),
        "\"ACPI0013\"".to_owned(),
        "METHOD (_EVT, 1, SERIALIZED)".to_owned(),
        "NOTIFY (\\_SB.PWRB, 0X80)".to_owned(),
        "DEVICE (_SB.PWRB)".to_owned(),
        "EISAID (\"PNP0C0C\")".to_owned(),
        "NAME (_S5, PACKAGE".to_owned(),
        // ACPI PCI hotplug: the controller, its registers and methods, the slots, the GED's scan.
        "DEVICE (_SB.PHPR)".to_owned(),
        "EISAID (\"PNP0A06\")".to_owned(),
        "MUTEX (BLCK, 0X00)".to_owned(),
        format!(
            "OPERATIONREGION (PCST, SYSTEMMEMORY, 0X{:08X}, 0X10)",
            layout::PCI_HOTPLUG_MMIO_START.0
        ),
        "PCIU,   32".to_owned(),
        "PCID,   32".to_owned(),
        "B0EJ,   32".to_owned(),
        "PSEG,   32".to_owned(),
        "METHOD (PCEJ, 2, SERIALIZED)".to_owned(),
        "METHOD (PSCN, 0, SERIALIZED)".to_owned(),
        "\\_SB.PCI0.PCNT ()".to_owned(),
        "\\_SB.PHPR.PSCN ()".to_owned(),
        "METHOD (PCNT, 0, SERIALIZED)".to_owned(),
        "DVNT (\\_SB.PHPR.PCIU, ONE)".to_owned(),
        "DVNT (\\_SB.PHPR.PCID, 0X03)".to_owned(),
        "DEVICE (S001)".to_owned(),
        "DEVICE (S031)".to_owned(),
        "NAME (_ADR, 0X001F0000)".to_owned(),
        "\\_SB.PHPR.PCEJ (_SUN, _SEG)".to_owned(),
        "NOTIFY (S031, ARG1)".to_owned(),
    ] {
        assert!(text.contains(&expected), "DSDT lacks {expected:?}:\n{dsdt}");
    }
}

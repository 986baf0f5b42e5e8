//! The devices `corelm plan` checks a model against: iPhone 12 to iPhone 17 Pro, iPads with
//! M-series chips, and Mac M1 to M4 families in their common memory sizes.
//!
//! Every number has a source in `docs/devices.md`, and every figure says how it is known:
//! [`Basis::Spec`] (Apple's published figure), [`Basis::Measured`] (a public measurement) or
//! [`Basis::Estimate`] (derived, with the derivation in the doc). Memory sizes are binary
//! gigabytes (GiB, as the memory chips are); bandwidths are decimal GB/s, as Apple quotes them.

use serde::Serialize;

/// How a figure is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Basis {
    /// Apple's published specification.
    Spec,
    /// A public measurement (cited in `docs/devices.md`).
    Measured,
    /// Derived from other figures; the rule is in `docs/devices.md`.
    Estimate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Kind {
    #[serde(rename = "iPhone")]
    IPhone,
    #[serde(rename = "iPad")]
    IPad,
    #[serde(rename = "Mac")]
    Mac,
}

impl Kind {
    /// iOS and iPadOS give an app a fraction of the RAM; macOS a working set of the GPU.
    pub fn is_mobile(self) -> bool {
        matches!(self, Kind::IPhone | Kind::IPad)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Device {
    pub name: &'static str,
    pub kind: Kind,
    pub chip: &'static str,
    /// Installed memory in GiB.
    pub ram_gib: f64,
    /// Memory one app may use, in GiB: on iPhone and iPad with the
    /// `com.apple.developer.kernel.increased-memory-limit` entitlement; on a Mac, Metal's
    /// recommended working set (2/3 of RAM up to 32 GiB, 3/4 above).
    pub usable_gib: f64,
    pub usable_source: Basis,
    /// Peak memory bandwidth in GB/s (10^9 bytes per second).
    pub bandwidth_gbps: f64,
    pub bandwidth_source: Basis,
    /// Neural Engine trillions of operations per second, when known.
    pub neural_engine_tops: Option<f64>,
    pub tops_source: Basis,
}

pub const GIB: f64 = (1u64 << 30) as f64;

impl Device {
    pub fn ram_bytes(&self) -> u64 {
        (self.ram_gib * GIB) as u64
    }

    pub fn usable_bytes(&self) -> u64 {
        (self.usable_gib * GIB) as u64
    }

    /// Bytes per second.
    pub fn bandwidth(&self) -> f64 {
        self.bandwidth_gbps * 1e9
    }
}

use Basis::{Estimate, Measured, Spec};

#[allow(clippy::too_many_arguments)]
const fn phone(
    name: &'static str,
    chip: &'static str,
    ram_gib: f64,
    usable_gib: f64,
    usable_source: Basis,
    bandwidth_gbps: f64,
    tops: Option<f64>,
) -> Device {
    Device {
        name,
        kind: Kind::IPhone,
        chip,
        ram_gib,
        usable_gib,
        usable_source,
        bandwidth_gbps,
        // No iPhone chip has a published bandwidth: all are the memory type's peak rate.
        bandwidth_source: Estimate,
        neural_engine_tops: tops,
        tops_source: Spec,
    }
}

#[allow(clippy::too_many_arguments)]
const fn ipad(
    name: &'static str,
    chip: &'static str,
    ram_gib: f64,
    usable_gib: f64,
    usable_source: Basis,
    bandwidth_gbps: f64,
    bandwidth_source: Basis,
    tops: f64,
) -> Device {
    Device {
        name,
        kind: Kind::IPad,
        chip,
        ram_gib,
        usable_gib,
        usable_source,
        bandwidth_gbps,
        bandwidth_source,
        neural_engine_tops: Some(tops),
        tops_source: Spec,
    }
}

/// Metal's `recommendedMaxWorkingSetSize` as reported on Apple-silicon Macs: 2/3 of the RAM up
/// to 32 GiB, 3/4 above (reported for M1 16 GB, M1 Max 32 and 64 GB, M2 Max 32 and 96 GB; the
/// other configurations follow the rule).
const fn mac_usable(ram_gib: f64) -> f64 {
    if ram_gib <= 32.0 {
        ram_gib * 2.0 / 3.0
    } else {
        ram_gib * 3.0 / 4.0
    }
}

/// `usable_source`: `Measured` where the working set was reported for this configuration.
#[allow(clippy::too_many_arguments)]
const fn mac(
    name: &'static str,
    chip: &'static str,
    ram_gib: f64,
    usable_source: Basis,
    bandwidth_gbps: f64,
    bandwidth_source: Basis,
    tops: f64,
    tops_source: Basis,
) -> Device {
    Device {
        name,
        kind: Kind::Mac,
        chip,
        ram_gib,
        usable_gib: mac_usable(ram_gib),
        usable_source,
        bandwidth_gbps,
        bandwidth_source,
        neural_engine_tops: Some(tops),
        tops_source,
    }
}

// Peak rates of the memory types on a 64-bit (phone) bus, in GB/s: LPDDR4X-4266 34.1,
// LPDDR5-6400 51.2, LPDDR5X-7500 60.0; A19 / A19 Pro as reported from their memory clocks.
const LPDDR4X_64: f64 = 34.1;
const LPDDR5_64: f64 = 51.2;
const LPDDR5X_7500_64: f64 = 60.0;
const A19_BW: f64 = 68.26;
const A19_PRO_BW: f64 = 75.8;
// M1's 128-bit LPDDR4X-4266: 68.25 GB/s (Apple did not publish it at launch).
const M1_BW: f64 = 68.25;

pub const DEVICES: &[Device] = &[
    // iPhone: usable = the per-app limit with the increased-memory-limit entitlement.
    phone("iPhone 12 / 12 mini", "A14 Bionic", 4.0, 2.4, Measured, LPDDR4X_64, Some(11.0)),
    phone("iPhone 12 Pro / Pro Max", "A14 Bionic", 6.0, 4.2, Estimate, LPDDR4X_64, Some(11.0)),
    phone("iPhone 13 / 13 mini", "A15 Bionic", 4.0, 2.4, Estimate, LPDDR4X_64, Some(15.8)),
    phone("iPhone 13 Pro / Pro Max", "A15 Bionic", 6.0, 4.2, Measured, LPDDR4X_64, Some(15.8)),
    phone("iPhone 14 / 14 Plus", "A15 Bionic (5-core GPU)", 6.0, 4.2, Estimate, LPDDR4X_64, Some(15.8)),
    phone("iPhone 14 Pro / Pro Max", "A16 Bionic", 6.0, 4.2, Estimate, LPDDR5_64, Some(17.0)),
    phone("iPhone 15 / 15 Plus", "A16 Bionic", 6.0, 4.2, Estimate, LPDDR5_64, Some(17.0)),
    phone("iPhone 15 Pro / Pro Max", "A17 Pro", 8.0, 6.0, Measured, LPDDR5_64, Some(35.0)),
    phone("iPhone 16 / 16 Plus", "A18", 8.0, 6.0, Estimate, LPDDR5X_7500_64, Some(35.0)),
    phone("iPhone 16 Pro / Pro Max", "A18 Pro", 8.0, 6.0, Estimate, LPDDR5X_7500_64, Some(35.0)),
    phone("iPhone 17", "A19", 8.0, 6.0, Estimate, A19_BW, None),
    phone("iPhone Air", "A19 Pro (5-core GPU)", 12.0, 8.0, Estimate, A19_PRO_BW, None),
    phone("iPhone 17 Pro / Pro Max", "A19 Pro", 12.0, 8.0, Estimate, A19_PRO_BW, None),
    // iPad: usable with the entitlement; 6 GB of 8 and 12 GB of 16 as reported for M1 iPad Pro.
    ipad("iPad Pro M1 (8 GB)", "M1", 8.0, 6.0, Measured, M1_BW, Estimate, 11.0),
    ipad("iPad Pro M1 (16 GB, 1-2 TB)", "M1", 16.0, 12.0, Measured, M1_BW, Estimate, 11.0),
    ipad("iPad Air M1", "M1", 8.0, 6.0, Estimate, M1_BW, Estimate, 11.0),
    ipad("iPad Pro M2 (8 GB)", "M2", 8.0, 6.0, Estimate, 100.0, Spec, 15.8),
    ipad("iPad Pro M2 (16 GB, 1-2 TB)", "M2", 16.0, 12.0, Estimate, 100.0, Spec, 15.8),
    ipad("iPad Air M2", "M2", 8.0, 6.0, Estimate, 100.0, Spec, 15.8),
    ipad("iPad Air M3", "M3", 8.0, 6.0, Estimate, 100.0, Spec, 18.0),
    ipad("iPad Pro M4 (8 GB)", "M4", 8.0, 6.0, Estimate, 120.0, Spec, 38.0),
    ipad("iPad Pro M4 (16 GB, 1-2 TB)", "M4", 16.0, 12.0, Estimate, 120.0, Spec, 38.0),
    // Mac: usable = Metal's recommended working set (see `mac_usable`).
    mac("Mac M1 8GB", "M1", 8.0, Estimate, M1_BW, Estimate, 11.0, Spec),
    mac("Mac M1 16GB", "M1", 16.0, Measured, M1_BW, Estimate, 11.0, Spec),
    mac("Mac M1 Pro 16GB", "M1 Pro", 16.0, Estimate, 200.0, Spec, 11.0, Estimate),
    mac("Mac M1 Pro 32GB", "M1 Pro", 32.0, Estimate, 200.0, Spec, 11.0, Estimate),
    mac("Mac M1 Max 32GB", "M1 Max", 32.0, Measured, 400.0, Spec, 11.0, Estimate),
    mac("Mac M1 Max 64GB", "M1 Max", 64.0, Measured, 400.0, Spec, 11.0, Estimate),
    mac("Mac M2 8GB", "M2", 8.0, Estimate, 100.0, Spec, 15.8, Spec),
    mac("Mac M2 16GB", "M2", 16.0, Estimate, 100.0, Spec, 15.8, Spec),
    mac("Mac M2 24GB", "M2", 24.0, Estimate, 100.0, Spec, 15.8, Spec),
    mac("Mac M2 Pro 16GB", "M2 Pro", 16.0, Estimate, 200.0, Spec, 15.8, Estimate),
    mac("Mac M2 Pro 32GB", "M2 Pro", 32.0, Estimate, 200.0, Spec, 15.8, Estimate),
    mac("Mac M2 Max 32GB", "M2 Max", 32.0, Measured, 400.0, Spec, 15.8, Estimate),
    mac("Mac M2 Max 64GB", "M2 Max", 64.0, Estimate, 400.0, Spec, 15.8, Estimate),
    mac("Mac M2 Max 96GB", "M2 Max", 96.0, Measured, 400.0, Spec, 15.8, Estimate),
    mac("Mac M3 8GB", "M3", 8.0, Estimate, 100.0, Spec, 18.0, Spec),
    mac("Mac M3 16GB", "M3", 16.0, Estimate, 100.0, Spec, 18.0, Spec),
    mac("Mac M3 24GB", "M3", 24.0, Estimate, 100.0, Spec, 18.0, Spec),
    mac("Mac M3 Pro 18GB", "M3 Pro", 18.0, Estimate, 150.0, Spec, 18.0, Estimate),
    mac("Mac M3 Pro 36GB", "M3 Pro", 36.0, Estimate, 150.0, Spec, 18.0, Estimate),
    mac("Mac M3 Max 36GB (30-core GPU)", "M3 Max 14-core CPU", 36.0, Estimate, 300.0, Spec, 18.0, Estimate),
    mac("Mac M3 Max 96GB (30-core GPU)", "M3 Max 14-core CPU", 96.0, Estimate, 300.0, Spec, 18.0, Estimate),
    mac("Mac M3 Max 48GB", "M3 Max 16-core CPU", 48.0, Estimate, 400.0, Spec, 18.0, Estimate),
    mac("Mac M3 Max 64GB", "M3 Max 16-core CPU", 64.0, Estimate, 400.0, Spec, 18.0, Estimate),
    mac("Mac M3 Max 128GB", "M3 Max 16-core CPU", 128.0, Estimate, 400.0, Spec, 18.0, Estimate),
    mac("Mac M4 16GB", "M4", 16.0, Estimate, 120.0, Spec, 38.0, Spec),
    mac("Mac M4 24GB", "M4", 24.0, Estimate, 120.0, Spec, 38.0, Spec),
    mac("Mac M4 32GB", "M4", 32.0, Estimate, 120.0, Spec, 38.0, Spec),
    mac("Mac M4 Pro 24GB", "M4 Pro", 24.0, Estimate, 273.0, Spec, 38.0, Estimate),
    mac("Mac M4 Pro 48GB", "M4 Pro", 48.0, Estimate, 273.0, Spec, 38.0, Estimate),
    mac("Mac M4 Pro 64GB", "M4 Pro", 64.0, Estimate, 273.0, Spec, 38.0, Estimate),
    mac("Mac M4 Max 36GB (32-core GPU)", "M4 Max 14-core CPU", 36.0, Estimate, 410.0, Spec, 38.0, Estimate),
    mac("Mac M4 Max 48GB", "M4 Max 16-core CPU", 48.0, Estimate, 546.0, Spec, 38.0, Estimate),
    mac("Mac M4 Max 64GB", "M4 Max 16-core CPU", 64.0, Estimate, 546.0, Spec, 38.0, Estimate),
    mac("Mac M4 Max 128GB", "M4 Max 16-core CPU", 128.0, Estimate, 546.0, Spec, 38.0, Estimate),
];

/// Devices whose name matches `query`: an exact (case-insensitive) name first, else every name
/// containing the query, ignoring case and spaces.
pub fn find(query: &str) -> Vec<&'static Device> {
    let norm = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>().to_lowercase();
    if let Some(d) = DEVICES.iter().find(|d| d.name.eq_ignore_ascii_case(query.trim())) {
        return vec![d];
    }
    let q = norm(query);
    DEVICES.iter().filter(|d| norm(d.name).contains(&q)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_figures_sane() {
        let mut names: Vec<_> = DEVICES.iter().map(|d| d.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), DEVICES.len());
        for d in DEVICES {
            assert!(d.usable_gib > 0.0 && d.usable_gib < d.ram_gib, "{}", d.name);
            assert!(d.bandwidth_gbps > 10.0, "{}", d.name);
        }
    }

    #[test]
    fn mac_working_set_rule_matches_the_measurements() {
        // recommendedMaxWorkingSetSize: 10922.67 MiB (16 GB), 21845.34 MB (32 GB),
        // 49152 MiB (64 GB), 73728 MB (96 GB); see docs/devices.md.
        assert!((mac_usable(16.0) * 1024.0 - 10922.67).abs() < 0.01);
        assert!((mac_usable(32.0) * 1024.0 - 21845.34).abs() < 0.01);
        assert_eq!(mac_usable(64.0) * 1024.0, 49152.0);
        assert_eq!(mac_usable(96.0) * 1024.0, 73728.0);
    }

    #[test]
    fn finds_devices_by_name() {
        assert_eq!(find("iphone 15 pro / pro max").len(), 1);
        assert_eq!(find("iPhone 15").len(), 2);
        assert_eq!(find("macm4max").len(), 4);
        assert!(find("Pixel").is_empty());
    }
}

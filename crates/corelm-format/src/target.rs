//! Deployment targets: specification version, OS release and MIL opset move together.

use std::fmt;

/// An OS generation a model is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Ios15,
    Ios16,
    Ios17,
    Ios18,
    Ios26,
}

pub const ALL_TARGETS: [Target; 5] = [Target::Ios15, Target::Ios16, Target::Ios17, Target::Ios18, Target::Ios26];

impl Target {
    pub fn spec_version(self) -> i32 {
        match self {
            Target::Ios15 => 6,
            Target::Ios16 => 7,
            Target::Ios17 => 8,
            Target::Ios18 => 9,
            Target::Ios26 => 10,
        }
    }

    /// The `Function.opset` / block specialization key.
    pub fn opset(self) -> &'static str {
        match self {
            Target::Ios15 => "CoreML5",
            Target::Ios16 => "CoreML6",
            Target::Ios17 => "CoreML7",
            Target::Ios18 => "CoreML8",
            Target::Ios26 => "CoreML9",
        }
    }

    /// The function suffix MIL text uses (`func main<ios18>`).
    pub fn mil_name(self) -> &'static str {
        match self {
            Target::Ios15 => "ios15",
            Target::Ios16 => "ios16",
            Target::Ios17 => "ios17",
            Target::Ios18 => "ios18",
            Target::Ios26 => "ios26",
        }
    }

    /// Operating systems this target means, for reports.
    pub fn os_releases(self) -> &'static str {
        match self {
            Target::Ios15 => "iOS 15 / macOS 12",
            Target::Ios16 => "iOS 16 / macOS 13",
            Target::Ios17 => "iOS 17 / macOS 14",
            Target::Ios18 => "iOS 18 / macOS 15",
            Target::Ios26 => "iOS 26 / macOS 26",
        }
    }

    pub fn from_spec_version(version: i32) -> Option<Target> {
        ALL_TARGETS.into_iter().find(|t| t.spec_version() == version)
    }

    pub fn from_opset(opset: &str) -> Option<Target> {
        ALL_TARGETS.into_iter().find(|t| t.opset() == opset)
    }

    pub fn from_name(name: &str) -> Option<Target> {
        ALL_TARGETS.into_iter().find(|t| t.mil_name() == name)
    }

    /// States and multifunction models need Core ML 8.
    pub fn supports_states(self) -> bool {
        self >= Target::Ios18
    }

    /// fp16 model inputs and outputs need Core ML 6.
    pub fn supports_fp16_io(self) -> bool {
        self >= Target::Ios16
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.mil_name())
    }
}

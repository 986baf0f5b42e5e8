//! `corelm`: convert, inspect, verify and run Core ML language models.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use corelm_contract::driver::LanguageModel;
use corelm_contract::keys;
use corelm_convert::compress::{Policy, Scheme};
use corelm_format::inspect::Report;
use corelm_format::mil::printer::program_text;
use corelm_format::Package;
use corelm_interp::Interpreter;

/// Writes to stdout; a closed pipe (`corelm ... | head`) ends the output quietly.
macro_rules! emit {
    ($($arg:tt)*) => {{
        use std::io::Write;
        if let Err(e) = write!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

macro_rules! emitln {
    ($($arg:tt)*) => {{
        emit!($($arg)*);
        emit!("\n");
    }};
}

#[derive(Parser)]
#[command(name = "corelm", version, about = "Large language models to Core ML ML Programs, without Python")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a Hugging Face model folder (config.json + safetensors) or a GGUF file into a
    /// stateful ML Program package.
    Convert(ConvertArgs),
    /// Show what a package holds: target, functions, inputs, states, outputs, ops, metadata,
    /// weights, and any problem found (exit code 1 when there is one).
    Inspect {
        /// The .mlpackage folder.
        package: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Print the program as MIL text.
        #[arg(long, conflicts_with = "json")]
        mil: bool,
    },
    /// Run a sequence of predictions sharing one state on the reference interpreter.
    Predict {
        /// The .mlpackage folder.
        package: PathBuf,
        /// JSON list of calls, each mapping input names to {"shape", "dtype", "data"}.
        #[arg(long)]
        calls: PathBuf,
        /// Function to run (multifunction models); default: the package's default.
        #[arg(long)]
        function: Option<String>,
        /// Print JSON (the default output is JSON too, pretty-printed).
        #[arg(long)]
        json: bool,
    },
    /// Generate text from a package on the reference interpreter: with --prompt, through the
    /// package's tokenizer and chat template, streaming text to stdout (stats to stderr); with
    /// --ids, greedy token ids.
    Run(RunArgs),
    /// Chat with a package in the terminal, keeping the conversation (and its KV cache) across
    /// turns. Commands: /reset starts over, /quit (or end of input) leaves.
    Chat {
        /// The .mlpackage folder.
        package: PathBuf,
        /// A system message for the conversation.
        #[arg(long)]
        system: Option<String>,
        /// Tokens to generate per reply at most.
        #[arg(long, default_value_t = 256)]
        max_new_tokens: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        #[command(flatten)]
        template: TemplateOptions,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Compare a package with a float32 conversion of its source on the same text: top-1
    /// agreement, max logit error, KL divergence and both perplexities.
    Verify {
        /// The .mlpackage folder to check.
        package: PathBuf,
        /// The source it was converted from (model folder or .gguf, run as a float32 conversion),
        /// or another package (e.g. the fp16 package a compressed one came from).
        #[arg(long)]
        against: PathBuf,
        /// Text to score (default: a built-in public-domain paragraph), in windows of the
        /// package's context.
        #[arg(long)]
        text: Option<PathBuf>,
        /// Tokens of the text to use at most (default: all).
        #[arg(long)]
        max_tokens: Option<usize>,
        /// Also write each position's KL and top-1 agreement to this JSON file (to compare two
        /// packages position by position against the same reference).
        #[arg(long)]
        positions: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Perplexity of a package on a text, on the reference interpreter, in windows of its
    /// context (each window from an empty cache).
    Eval {
        /// The .mlpackage folder.
        package: PathBuf,
        /// UTF-8 text file to score.
        #[arg(long)]
        text: PathBuf,
        /// Tokens per window (default and maximum: the package's context).
        #[arg(long)]
        window: Option<usize>,
        /// Tokens of the text to use at most (default: all).
        #[arg(long)]
        max_tokens: Option<usize>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compress the weights of a package into a new package (iOS 18 targets).
    Compress {
        /// The .mlpackage to compress.
        input: PathBuf,
        /// Output package.
        #[arg(short, long)]
        output: PathBuf,
        #[command(flatten)]
        compress: CompressArgs,
        /// Calibrate on this text: the package reads it first (on the interpreter), and integer
        /// schemes round each layer's weights to keep that layer's outputs on the text close
        /// (GPTQ-style error feedback) instead of taking the nearest integers. Not the embedding
        /// table or LM head.
        #[arg(long, value_name = "TEXT")]
        calibrate: Option<PathBuf>,
        /// Tokens of the calibration text to read at most.
        #[arg(long, default_value_t = 8192, requires = "calibrate")]
        calibration_tokens: usize,
        #[command(flatten)]
        write: WriteArgs,
        /// Print a JSON summary.
        #[arg(long)]
        json: bool,
    },
    /// Package a model for delivery: the package plus bundle.json (every file with its size and
    /// SHA-256, model id, version, minimum OS), as a folder or a .tar file; or check a bundle.
    Bundle {
        /// The .mlpackage to bundle; with --verify, the bundle (folder or .tar) to check.
        path: PathBuf,
        /// Output folder, or a file ending in .tar.
        #[arg(short, long, required_unless_present = "verify")]
        output: Option<PathBuf>,
        /// Check every file of a bundle against its manifest (exit 1 on any mismatch).
        #[arg(long)]
        verify: bool,
        /// Replace an existing output.
        #[arg(long)]
        force: bool,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Download a bundle .tar (HTTP or HTTPS, resumed after interruptions), check its SHA-256 and
    /// install it into a cache folder, as <DIR>/<sha256>/; prints the installed package's path.
    Fetch {
        url: String,
        /// Expected SHA-256 of the bundle file (64 hex digits).
        #[arg(long)]
        sha256: String,
        /// The cache folder.
        #[arg(short, long)]
        output: PathBuf,
        /// Stop and discard the download past this many bytes (the bundle's size, when
        /// published with its SHA-256). Default: 64 GiB.
        #[arg(long, default_value_t = corelm_runtime::fetch::DEFAULT_MAX_SIZE)]
        max_size: u64,
        /// Seconds connecting, waiting for the response, or any one read may take before the
        /// attempt is retried (4 attempts in all).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        timeout: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check packages against the format rules; exits 1 if any problem is found.
    Validate {
        /// One or more .mlpackage folders.
        #[arg(required = true)]
        packages: Vec<PathBuf>,
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Plan a deployment: weights, KV cache (honouring sliding-window layers), activations and
    /// load overhead; whether it fits each device's app memory; a decode tokens/s upper bound; and
    /// the recommended compression, context and compute units. Devices and sources: docs/devices.md.
    Plan {
        /// A model folder (only config.json is read), a config.json, a .gguf file or a .mlpackage.
        source: PathBuf,
        /// One device, or every device whose name contains this text (default: all devices).
        #[arg(long)]
        device: Option<String>,
        /// Tokens the KV cache holds (default: the package's context, else what `convert` would
        /// give the source: 2048, or the positions it was trained for when fewer).
        #[arg(long)]
        context: Option<usize>,
        /// Weight compression to plan (default: fp16, or a package as stored).
        #[arg(long, value_parser = ["fp16", "int8", "int4", "lut4", "lut6", "mixed"])]
        quantize: Option<String>,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct ConvertArgs {
    /// Model folder (config.json, *.safetensors, tokenizer files) or .gguf file.
    source: PathBuf,
    /// Output package (must end in .mlpackage).
    #[arg(short, long)]
    output: PathBuf,
    /// Tokens the KV cache holds [default: 2048, or the positions the model was trained for when
    /// fewer].
    #[arg(long)]
    context: Option<usize>,
    /// Fixed query lengths, one function each sharing the weights (e.g. 1,64); default: one
    /// function with a flexible query length.
    #[arg(long, value_delimiter = ',')]
    query_lengths: Vec<usize>,
    /// Attention as one fused op, or as matmul + softmax + matmul.
    #[arg(long, value_enum, default_value_t = AttentionArg::Fused)]
    attention: AttentionArg,
    /// Deployment target.
    #[arg(long, value_enum, default_value_t = TargetArg::Ios18)]
    target: TargetArg,
    /// Compute precision.
    #[arg(long, value_enum, default_value_t = PrecisionArg::Fp16)]
    precision: PrecisionArg,
    /// What the graph is shaped for: `ane` is the Neural Engine's form (fp16 throughout, fixed
    /// query lengths 1 and 64 unless --query-lengths says otherwise, context padded to a
    /// multiple of 32, vocabularies over 65536 split; see docs/ane-rules.md).
    #[arg(long, value_enum, default_value_t = ProfileArg::Default)]
    profile: ProfileArg,
    /// Split the layer stack into this many packages, run in sequence as one model
    /// (OUT_1ofK.mlpackage, ...; the tokenizer travels with the first).
    #[arg(long, default_value_t = 1)]
    chunks: usize,
    #[command(flatten)]
    compress: CompressArgs,
    #[command(flatten)]
    write: WriteArgs,
    /// Print a JSON summary instead of the progress bar and text.
    #[arg(long)]
    json: bool,
    /// Skip the check that runs the new package on a few tokens and refuses it when a logit is
    /// NaN or infinite.
    #[arg(long)]
    no_check: bool,
}

/// What the chat template gets besides the messages.
#[derive(clap::Args)]
struct TemplateOptions {
    /// A variable for the chat template, KEY=VALUE, the value read as JSON if it is JSON and as
    /// text otherwise: e.g. `enable_thinking=false` (Qwen3, SmolLM3). Repeatable.
    #[arg(long = "template-var", value_name = "KEY=VALUE", value_parser = parse_template_var)]
    template_vars: Vec<(String, serde_json::Value)>,
    /// The tools the model may call: a JSON file holding a list of function schemas, which the
    /// chat template receives as `tools`.
    #[arg(long, value_name = "FILE")]
    tools: Option<PathBuf>,
}

fn parse_template_var(s: &str) -> std::result::Result<(String, serde_json::Value), String> {
    let (key, value) = s.split_once('=').ok_or_else(|| format!("`{s}` is not KEY=VALUE"))?;
    if key.is_empty() {
        return Err(format!("`{s}` has no key before `=`"));
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
    Ok((key.to_string(), value))
}

impl TemplateOptions {
    fn args(&self) -> Result<corelm_runtime::chat::TemplateArgs> {
        let tools = match &self.tools {
            None => None,
            Some(path) => {
                let text = std::fs::read(path).with_context(|| format!("cannot read tools file {}", path.display()))?;
                let value: serde_json::Value = serde_json::from_slice(&text)
                    .with_context(|| format!("tools file {} is not valid JSON", path.display()))?;
                match value {
                    serde_json::Value::Array(list) if list.iter().all(|t| t.is_object()) => Some(list),
                    _ => anyhow::bail!("tools file {} must hold a JSON list of tool schemas (objects)", path.display()),
                }
            }
        };
        Ok(corelm_runtime::chat::TemplateArgs {
            add_generation_prompt: true,
            tools,
            documents: None,
            variables: self.template_vars.iter().cloned().collect(),
        })
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// The .mlpackage folder.
    package: PathBuf,
    /// The user message (the chat template is applied unless --raw).
    #[arg(long, conflicts_with = "ids")]
    prompt: Option<String>,
    /// A system message placed before the prompt.
    #[arg(long, requires = "prompt")]
    system: Option<String>,
    /// Feed the prompt text as is, without the chat template.
    #[arg(long, requires = "prompt")]
    raw: bool,
    #[command(flatten)]
    template: TemplateOptions,
    /// Prompt token ids, comma separated (greedy, no tokenizer needed).
    #[arg(long, value_delimiter = ',', required_unless_present = "prompt")]
    ids: Vec<u32>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Drop the oldest prompt tokens when the prompt does not fit the context.
    #[arg(long)]
    truncate: bool,
    /// With --ids: include the logits at the last prompt position in the JSON.
    #[arg(long)]
    logits: bool,
    /// With --ids: keep generating past the package's end-of-sequence ids.
    #[arg(long)]
    ignore_eos: bool,
    /// Print JSON instead of streaming text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    backend: BackendArgs,
}

#[derive(clap::Args, Clone)]
struct BackendArgs {
    /// Where the model runs: corelm's reference interpreter (anywhere) or Core ML (Apple).
    #[arg(long, value_enum, default_value_t = BackendArg::Reference)]
    backend: BackendArg,
    /// Processors Core ML may use.
    #[arg(long, value_enum, default_value_t = ComputeUnitsArg::All)]
    compute_units: ComputeUnitsArg,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BackendArg {
    Reference,
    Coreml,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ComputeUnitsArg {
    All,
    CpuAndGpu,
    CpuAndNeuralEngine,
    CpuOnly,
}

impl BackendArgs {
    /// The package with its tokenizer and chat template, on the chosen backend.
    fn open(&self, pkg: &Package) -> Result<corelm_runtime::model::TextModel> {
        Ok(corelm_runtime::model::TextModel::with_backend(pkg, self.open_backend(pkg)?)?)
    }

    /// The package alone (no tokenizer needed), on the chosen backend.
    fn open_backend(&self, pkg: &Package) -> Result<LanguageModel> {
        match self.backend {
            BackendArg::Reference => Ok(corelm_runtime::model::reference_backend(pkg)?),
            BackendArg::Coreml => self.open_coreml(pkg),
        }
    }

    #[cfg(target_vendor = "apple")]
    fn open_coreml(&self, pkg: &Package) -> Result<LanguageModel> {
        use corelm_runtime::coreml::ComputeUnits;
        let units = match self.compute_units {
            ComputeUnitsArg::All => ComputeUnits::All,
            ComputeUnitsArg::CpuAndGpu => ComputeUnits::CpuAndGpu,
            ComputeUnitsArg::CpuAndNeuralEngine => ComputeUnits::CpuAndNeuralEngine,
            ComputeUnitsArg::CpuOnly => ComputeUnits::CpuOnly,
        };
        let cache = std::env::var_os("CORELM_CACHE").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join("Library/Caches/corelm/compiled")
        });
        Ok(corelm_runtime::model::coreml_backend(pkg, units, &cache)?)
    }

    #[cfg(not(target_vendor = "apple"))]
    fn open_coreml(&self, _pkg: &Package) -> Result<LanguageModel> {
        let _ = self.compute_units;
        anyhow::bail!("the Core ML backend runs on Apple platforms only; use --backend reference here")
    }
}

#[derive(clap::Args, Clone)]
struct SamplingArgs {
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    fn params(&self) -> corelm_runtime::sampler::SamplingParams {
        corelm_runtime::sampler::SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            seed: self.seed,
        }
    }
}

fn run_text(args: RunArgs, prompt: String) -> Result<ExitCode> {
    use corelm_runtime::chat::Message;
    use corelm_runtime::generate::{generate, GenerateParams};
    // Read first: a bad tools file fails before the model loads.
    let template_args = args.template.args()?;
    let pkg = open(&args.package)?;
    let mut model = args.backend.open(&pkg).with_context(|| format!("cannot run {}", args.package.display()))?;
    let ids = if args.raw {
        model.tokenizer.encode(&prompt, true)?
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", &prompt));
        model.chat_prompt_with(&messages, &template_args)?
    };
    let params = GenerateParams {
        max_new_tokens: args.max_new_tokens,
        sampling: args.sampling.params(),
        eos_ids: model.eos_ids.clone(),
        stop_strings: args.stop.clone(),
        truncate_prompt: args.truncate,
    };
    let json = args.json;
    let mut on_text = |t: &str| {
        if !json {
            emit!("{t}");
            use std::io::Write;
            let _ = std::io::stdout().flush();
        }
    };
    let generation = generate(&mut model.backend, &model.tokenizer, &ids, &params, &mut on_text)?;
    if json {
        emitln!("{}", serde_json::to_string(&generation)?);
    } else {
        emitln!("");
        let s = &generation.stats;
        eprintln!(
            "{} prompt tokens, {} generated ({:?}); first token {:.2} s; prefill {:.1} tok/s, decode {:.1} tok/s",
            s.prompt_tokens,
            s.generated_tokens,
            generation.stop_reason,
            s.time_to_first_token_s,
            s.prefill_tokens_per_s,
            s.decode_tokens_per_s
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A size such as `1G`, `512M`, `64K` or a byte count (powers of 1024).
fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let shift = match unit.trim().to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        other => return Err(format!("unknown size unit `{other}` (use K, M or G)")),
    };
    let n: u64 = digits.parse().map_err(|_| format!("`{text}` is not a size"))?;
    n.checked_shl(shift).filter(|v| v >> shift == n).ok_or_else(|| format!("`{text}` is too large"))
}

/// How packages are written, shared by `convert` and `compress`.
#[derive(clap::Args)]
struct WriteArgs {
    /// Split weights over several files in weights/ of at most this size (K, M, G); never more
    /// than 2G (one file over 2 GiB keeps Core ML off the Neural Engine).
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    max_weight_file: u64,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
}

impl WriteArgs {
    fn options(&self) -> corelm_format::package::WriteOptions {
        corelm_format::package::WriteOptions { overwrite: self.force, max_weight_file_bytes: self.max_weight_file }
    }
}

/// Weight compression flags, shared by `convert` and `compress`.
#[derive(clap::Args)]
struct CompressArgs {
    /// Compress linear layers and embeddings: int8 (per output channel), int4 (per block of
    /// input columns), lut4/lut6/lut8 (k-means tables per group of output channels), or mixed
    /// (int4 layers, int8 embeddings and LM head).
    #[arg(long, value_enum)]
    quantize: Option<SchemeArg>,
    /// Input columns sharing one scale (int4 default 32; int8 default: whole rows).
    #[arg(long)]
    block_size: Option<usize>,
    /// Integer schemes with a zero point per block (asymmetric) instead of symmetric ranges.
    #[arg(long)]
    offset: bool,
    /// Output channels sharing one lookup table (lut schemes).
    #[arg(long, default_value_t = 16)]
    lut_group: usize,
    /// A different scheme (or `none`) for the embedding table and LM head.
    #[arg(long, value_enum)]
    quantize_embeddings: Option<EmbeddingSchemeArg>,
    /// Keep weights whose name contains this text uncompressed (repeatable; Hugging Face names,
    /// e.g. `layers.0.` or `down_proj`).
    #[arg(long, value_name = "TEXT")]
    keep: Vec<String>,
    /// From GGUF: dequantize every weight to the compute precision instead of keeping each grid
    /// Core ML can hold (the default: what you downloaded is what you get).
    #[arg(long)]
    dequantize: bool,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum SchemeArg {
    Int8,
    Int4,
    Lut4,
    Lut6,
    Lut8,
    Mixed,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum EmbeddingSchemeArg {
    None,
    Int8,
    Int4,
    Lut4,
    Lut6,
    Lut8,
}

impl CompressArgs {
    fn scheme(&self, name: &str) -> Scheme {
        let linear = |bits: u8, default_block: Option<usize>| Scheme::Linear {
            bits,
            block: self.block_size.or(default_block),
            offset: self.offset,
        };
        match name {
            "int8" => linear(8, None),
            "int4" => linear(4, Some(32)),
            lut => Scheme::Lut { bits: lut[3..].parse().expect("lut4/6/8"), group: self.lut_group },
        }
    }

    fn policy(&self) -> Result<Policy> {
        fn name(v: impl clap::ValueEnum) -> String {
            v.to_possible_value().expect("named").get_name().to_string()
        }
        let body = self.quantize.map(|q| match q {
            SchemeArg::Mixed => self.scheme("int4"),
            q => self.scheme(&name(q)),
        });
        let embeddings = match (self.quantize_embeddings, self.quantize) {
            (Some(EmbeddingSchemeArg::None), _) => None,
            (Some(e), _) => Some(self.scheme(&name(e))),
            (None, Some(SchemeArg::Mixed)) => Some(Scheme::Linear { bits: 8, block: None, offset: self.offset }),
            (None, _) => body,
        };
        for s in body.iter().chain(&embeddings) {
            s.check()?;
        }
        Ok(Policy { body, embeddings, keep: self.keep.clone(), keep_grids: !self.dequantize })
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum AttentionArg {
    Fused,
    Decomposed,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TargetArg {
    Ios16,
    Ios17,
    Ios18,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PrecisionArg {
    Fp16,
    Fp32,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ProfileArg {
    Default,
    Ane,
}

fn convert(args: ConvertArgs) -> Result<ExitCode> {
    use corelm_convert::graph::{AttentionImpl, GraphOptions, Precision, Profile};
    let target = match args.target {
        TargetArg::Ios16 => corelm_format::Target::Ios16,
        TargetArg::Ios17 => corelm_format::Target::Ios17,
        TargetArg::Ios18 => corelm_format::Target::Ios18,
    };
    if args.compress.dequantize && args.source.extension().is_none_or(|e| e != "gguf") {
        anyhow::bail!("--dequantize applies to GGUF files; {} is not one", args.source.display());
    }
    let source = corelm_convert::convert::open_source(&args.source)
        .with_context(|| format!("cannot read model {}", args.source.display()))?;
    let context = args.context.unwrap_or_else(|| corelm_convert::convert::default_context(&source.config));
    let opts = GraphOptions {
        target,
        context,
        query_lengths: args.query_lengths,
        attention: match args.attention {
            AttentionArg::Fused => AttentionImpl::Fused,
            AttentionArg::Decomposed => AttentionImpl::Decomposed,
        },
        precision: match args.precision {
            PrecisionArg::Fp16 => Precision::Fp16,
            PrecisionArg::Fp32 => Precision::Fp32,
        },
        compress: args.compress.policy()?,
        profile: match args.profile {
            ProfileArg::Default => Profile::Default,
            ProfileArg::Ane => Profile::Ane,
        },
        chunks: args.chunks,
    };
    let total = corelm_convert::graph::roles(&source.config)
        .into_iter()
        .filter(|r| corelm_convert::arch::tensor_spec(&source.config, *r).is_some())
        .count();
    let bar = if args.json {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} converting [{bar:30}] {pos}/{len} tensors {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar
    };
    let mut progress = |name: &str, _bytes: u64| {
        bar.set_message(name.to_string());
        bar.inc(1);
    };
    let summary = corelm_convert::convert::convert(&source, &args.output, &opts, &args.write.options(), &mut progress)
        .with_context(|| format!("cannot convert {}", args.source.display()))?;
    bar.finish_and_clear();
    if !args.no_check {
        if let Err(e) = check_finite(&summary.packages[0]) {
            for p in &summary.packages {
                let _ = std::fs::remove_dir_all(p);
            }
            return Err(e.context(format!(
                "{} was converted but fails its check, so it was removed (--no-check keeps it)",
                args.source.display()
            )));
        }
    }
    warn_grids_not_carried(&summary.source_grids);
    for note in &summary.notes {
        eprintln!("note: {note}");
    }
    if args.json {
        emitln!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let written: Vec<String> = summary.packages.iter().map(|p| p.display().to_string()).collect();
        let context_note = match args.context {
            Some(_) => String::new(),
            None if summary.context < corelm_convert::convert::DEFAULT_CONTEXT => {
                format!(" (default: the {} positions the model was trained for)", source.config.max_position_embeddings)
            }
            None => " (default)".to_string(),
        };
        emitln!(
            "{}: {} ({} parameters, {} layers, context {}{context_note}), {:.1} MB in {:.1} s",
            written.join(", "),
            summary.architecture,
            summary.parameters,
            summary.layers,
            summary.context,
            summary.output_bytes as f64 / 1e6,
            summary.seconds
        );
        for line in grid_lines(&summary.grid_types) {
            emitln!("{line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Tokens the check after a conversion feeds: more than a Neural Engine profile's decode chunk and
/// not a whole prefill chunk, so padding is exercised, yet cheap at any model size.
const CHECK_TOKENS: usize = 37;

/// Runs a new package (all its parts) on a few tokens and fails when any logit is NaN or
/// infinite: such a package must not ship unnoticed.
fn check_finite(package: &std::path::Path) -> Result<()> {
    let pkg = open(package)?;
    let mut lm = LanguageModel::open(&pkg, Interpreter::load)?;
    let ud = &pkg.model().description.metadata.user_defined;
    let number = |k: &str| ud.get(k).and_then(|v| v.parse::<u32>().ok());
    let vocab = number(keys::VOCAB_SIZE).unwrap_or(1) as usize;
    let ids = corelm_runtime::verify::probe_ids(vocab, number(keys::PAD_TOKEN_ID), CHECK_TOKENS.min(lm.context() - 1));
    let mut rows = lm.feed(&ids)?;
    rows.extend(lm.feed(&[ids[ids.len() / 2]])?);
    if let Some(at) = corelm_runtime::verify::first_non_finite(&rows) {
        anyhow::bail!("the package gives NaN or infinite logits at position {at} of a {}-token probe", rows.len());
    }
    Ok(())
}

/// Says on stderr which quantized source tensors were not carried on their grid, by type and
/// reason, with examples.
fn warn_grids_not_carried(grids: &[corelm_convert::graph::SourceGrid]) {
    let mut by_type: std::collections::BTreeMap<(&str, &str, &str), Vec<&str>> = Default::default();
    for g in grids {
        if let Some(reason) = &g.reason {
            by_type.entry((&g.source_type, &g.stored_as, reason)).or_default().push(&g.tensor);
        }
    }
    for ((source_type, stored_as, reason), tensors) in by_type {
        let shown: Vec<&str> = tensors.iter().take(3).copied().collect();
        let more = if tensors.len() > shown.len() { ", …" } else { "" };
        eprintln!(
            "warning: {} {source_type} tensor(s) stored as {stored_as}, not on their grid: {reason} ({}{more})",
            tensors.len(),
            shown.join(", ")
        );
    }
}

/// One line per ggml type of a quantized source: how its tensors were carried and their bytes.
fn grid_lines(types: &[corelm_convert::graph::GridType]) -> Vec<String> {
    types
        .iter()
        .map(|t| {
            let mut how = Vec::new();
            for (n, what) in [
                (t.exact, "exact".to_string()),
                (t.scale_rounded, format!("fp16-rounded scales, max error {:.1e}", t.max_error)),
                (t.dequantized, "dequantized".to_string()),
                (t.requantized, "re-quantized".to_string()),
            ] {
                if n > 0 {
                    how.push(format!("{n} {what}"));
                }
            }
            format!(
                "  {}: {} tensors ({}), {:.1} MB in the GGUF, {:.1} MB in the package ({:.2}×)",
                t.source_type,
                t.tensors,
                how.join(", "),
                t.source_bytes as f64 / 1e6,
                t.package_bytes as f64 / 1e6,
                t.package_bytes as f64 / t.source_bytes.max(1) as f64
            )
        })
        .collect()
}

fn chat(
    package: &std::path::Path,
    system: Option<String>,
    max_new_tokens: usize,
    sampling: SamplingArgs,
    template: TemplateOptions,
    backend: BackendArgs,
) -> Result<ExitCode> {
    use corelm_runtime::chat::Message;
    use corelm_runtime::generate::{generate, GenerateParams};
    use std::io::{BufRead, Write};
    let pkg = Package::open(package).with_context(|| format!("cannot read package {}", package.display()))?;
    let mut model = backend.open(&pkg).with_context(|| format!("cannot run {}", package.display()))?;
    let template_args = template.args()?;
    let start: Vec<Message> = system.iter().map(|s| Message::new("system", s)).collect();
    let mut messages = start.clone();
    // Tokens the backend holds; a new turn feeds only what extends them.
    let mut fed: Vec<u32> = Vec::new();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        emit!("you> ");
        let _ = std::io::stdout().flush();
        let Some(line) = lines.next() else { break };
        let line = line?;
        let line = line.trim();
        match line {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                messages = start.clone();
                fed.clear();
                model.backend.reset()?;
                emitln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        messages.push(Message::new("user", line));
        let ids = model.chat_prompt_with(&messages, &template_args)?;
        let new = if ids.starts_with(&fed) && model.backend.position() == fed.len() {
            ids[fed.len()..].to_vec()
        } else {
            model.backend.reset()?;
            ids.clone()
        };
        let params = GenerateParams {
            max_new_tokens,
            sampling: sampling.params(),
            eos_ids: model.eos_ids.clone(),
            stop_strings: vec![],
            truncate_prompt: false,
        };
        emit!("assistant> ");
        let mut on_text = |t: &str| {
            emit!("{t}");
            let _ = std::io::stdout().flush();
        };
        let g = match generate(&mut model.backend, &model.tokenizer, &new, &params, &mut on_text) {
            Ok(g) => g,
            Err(e) => {
                emitln!("");
                eprintln!("error: {e}; use /reset to start over");
                messages.pop();
                continue;
            }
        };
        emitln!("");
        fed = ids;
        fed.extend(&g.generated_ids);
        messages.push(Message::new("assistant", g.text.trim()));
    }
    emitln!("");
    Ok(ExitCode::SUCCESS)
}

/// The opening of "A Tale of Two Cities" (Charles Dickens, 1859; public domain).
const DEFAULT_TEXT: &str = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything before us, we had nothing before us, we were all going direct to Heaven, we were all going direct the other way - in short, the period was so far like the present period, that some of its noisiest authorities insisted on its being received, for good or for evil, in the superlative degree of comparison only.";

/// A progress bar over `len` items, hidden when the output is JSON.
fn progress_bar(len: u64, json: bool, what: &str) -> indicatif::ProgressBar {
    if json {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!("{{spinner}} {what} [{{bar:30}}] {{pos}}/{{len}} {{msg}}"))
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

/// The tokens of `text` (or the built-in paragraph), at most `max_tokens`.
fn text_tokens(pkg: &Package, text: Option<&PathBuf>, max_tokens: Option<usize>) -> Result<Vec<u32>> {
    let tokenizer = corelm_runtime::tokenizer::Tokenizer::from_package(pkg)?;
    let text = match text {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
        None => DEFAULT_TEXT.to_string(),
    };
    let mut tokens = tokenizer.encode(&text, true)?;
    tokens.truncate(max_tokens.unwrap_or(usize::MAX));
    if tokens.len() < 2 {
        anyhow::bail!("the text gives fewer than two tokens");
    }
    Ok(tokens)
}

fn is_package(path: &std::path::Path) -> bool {
    path.join("Manifest.json").is_file()
}

fn verify(
    package: &std::path::Path,
    against: &std::path::Path,
    text: Option<PathBuf>,
    max_tokens: Option<usize>,
    positions: Option<PathBuf>,
    json: bool,
) -> Result<ExitCode> {
    use corelm_convert::graph::{AttentionImpl, GraphOptions, Precision};
    let pkg = open(package)?;
    let mut lm =
        LanguageModel::open(&pkg, Interpreter::load).with_context(|| format!("cannot run {}", package.display()))?;
    let tokens = text_tokens(&pkg, text.as_ref(), max_tokens)?;
    let window = lm.context().min(tokens.len());
    let scratch = std::env::temp_dir().join(format!("corelm-verify-{}", std::process::id()));
    let result = (|| -> Result<corelm_runtime::verify::Agreement> {
        let reference_pkg = if is_package(against) {
            Package::open(against)?
        } else {
            let source = corelm_convert::convert::open_source(against)?;
            let reference_path = scratch.join("reference.mlpackage");
            let opts = GraphOptions {
                target: corelm_format::Target::Ios18,
                context: window,
                query_lengths: vec![],
                attention: AttentionImpl::Fused,
                precision: Precision::Fp32,
                compress: Policy::default(),
                profile: Default::default(),
                chunks: 1,
            };
            corelm_convert::convert::convert(
                &source,
                &reference_path,
                &opts,
                &corelm_format::package::WriteOptions::overwriting(),
                &mut |_: &str, _: u64| {},
            )?;
            Package::open(&reference_path)?
        };
        let mut reference = LanguageModel::open(&reference_pkg, Interpreter::load)?;
        let window = window.min(reference.context());
        let bar = progress_bar(tokens.len() as u64, json, "scoring");
        let tally =
            corelm_runtime::verify::score_windows(&tokens, window, &mut lm, Some(&mut reference), &mut |done| {
                bar.set_position(done as u64)
            })?;
        bar.finish_and_clear();
        Ok(tally.finish())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    let a = result.with_context(|| format!("cannot verify against {}", against.display()))?;
    if let Some(path) = positions {
        std::fs::write(&path, serde_json::to_vec(&a.per_position)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if json {
        emitln!("{}", serde_json::to_string_pretty(&a)?);
    } else {
        emitln!(
            "{} tokens: top-1 agreement {:.2}%, max |logit error| {:.4}, mean KL {:.2e} nats, perplexity {:.3} (package) vs {:.3} ({})",
            a.positions,
            a.top1_agreement * 100.0,
            a.max_abs_logit_error,
            a.mean_kl,
            a.perplexity_package,
            a.perplexity_reference,
            if is_package(against) { "reference package" } else { "float32 reference" }
        );
    }
    if a.non_finite_positions > 0 {
        eprintln!(
            "error: {}: NaN or infinite logits at {} of {} positions: the package is broken",
            package.display(),
            a.non_finite_positions,
            a.positions
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn eval(
    package: &std::path::Path,
    text: &PathBuf,
    window: Option<usize>,
    max_tokens: Option<usize>,
    json: bool,
) -> Result<ExitCode> {
    let pkg = open(package)?;
    let mut lm =
        LanguageModel::open(&pkg, Interpreter::load).with_context(|| format!("cannot run {}", package.display()))?;
    let tokens = text_tokens(&pkg, Some(text), max_tokens)?;
    let window = window.unwrap_or(usize::MAX).min(lm.context());
    if window < 2 {
        anyhow::bail!("--window must be at least 2 tokens");
    }
    let started = std::time::Instant::now();
    let bar = progress_bar(tokens.len() as u64, json, "evaluating");
    let tally = corelm_runtime::verify::score_windows(&tokens, window, &mut lm, None, &mut |done| {
        bar.set_position(done as u64)
    })
    .with_context(|| format!("cannot evaluate {}", package.display()))?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let perplexity = tally.finish().perplexity_package;
    if json {
        let out = serde_json::json!({
            "tokens": tokens.len(),
            "scored": tally.scored(),
            "windows": tokens.len().div_ceil(window),
            "window": window,
            "perplexity": perplexity,
            "seconds": seconds,
            "tokens_per_second": tokens.len() as f64 / seconds,
        });
        emitln!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        emitln!(
            "perplexity {perplexity:.3} over {} tokens ({} windows of {window}), {:.0} tokens/s",
            tally.scored(),
            tokens.len().div_ceil(window),
            tokens.len() as f64 / seconds
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn compress(
    input: &std::path::Path,
    output: &std::path::Path,
    args: &CompressArgs,
    calibration: Option<(&PathBuf, usize)>,
    write: &WriteArgs,
    json: bool,
) -> Result<ExitCode> {
    if args.dequantize {
        anyhow::bail!("--dequantize applies when converting from GGUF, not to packages");
    }
    let policy = args.policy()?;
    let grams = match calibration {
        None => Default::default(),
        Some((text, max_tokens)) => {
            let pkg = open(input)?;
            let tokens = text_tokens(&pkg, Some(text), Some(max_tokens))?;
            let bar = progress_bar(tokens.len() as u64, json, "calibrating on tokens");
            let grams = corelm_interp::calibrate::input_grams(&pkg, &tokens, &mut |done| bar.set_position(done as u64))
                .with_context(|| format!("cannot calibrate {} on {}", input.display(), text.display()))?;
            bar.finish_and_clear();
            grams
        }
    };
    let bar = if json { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new_spinner() };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} compressing: {pos} weights {msg}").expect("valid"),
    );
    let summary = corelm_convert::compress::package::compress_package(
        input,
        output,
        &policy,
        &grams,
        &write.options(),
        &mut |name, _| {
            bar.set_message(name.to_string());
            bar.inc(1);
        },
    )
    .with_context(|| format!("cannot compress {}", input.display()))?;
    bar.finish_and_clear();
    if json {
        emitln!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        emitln!(
            "{}: {} weights compressed, {} kept; {:.1} MB -> {:.1} MB in {:.1} s ({:.0} MB/s)",
            summary.output.display(),
            summary.compressed,
            summary.kept,
            summary.input_bytes as f64 / 1e6,
            summary.output_bytes as f64 / 1e6,
            summary.seconds,
            summary.megabytes_per_second
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn bundle(
    path: &std::path::Path,
    output: Option<&std::path::Path>,
    verify: bool,
    force: bool,
    json: bool,
) -> Result<ExitCode> {
    use corelm_runtime::bundle;
    let manifest = match (verify, output) {
        (true, _) => match bundle::verify(path) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("corelm: {e}");
                return Ok(ExitCode::from(1));
            }
        },
        (false, Some(out)) => {
            bundle::write(path, out, force).with_context(|| format!("cannot bundle {}", path.display()))?
        }
        (false, None) => anyhow::bail!("--output is required"),
    };
    if json {
        emitln!("{}", serde_json::to_string_pretty(&manifest)?);
    } else {
        let bytes: u64 = manifest.files.iter().map(|f| f.size).sum();
        emitln!(
            "{}: {} ({} {}, {}), {} files, {:.1} MB{}",
            output.unwrap_or(path).display(),
            manifest.package,
            manifest.model_id,
            manifest.version,
            manifest.minimum_os,
            manifest.files.len(),
            bytes as f64 / 1e6,
            if verify { ", every file matches its SHA-256" } else { "" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn fetch(
    url: &str,
    sha256: &str,
    cache: &std::path::Path,
    opts: &corelm_runtime::fetch::FetchOptions,
    json: bool,
) -> Result<ExitCode> {
    let bar = if json { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(0) };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} downloading [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let installed = corelm_runtime::fetch::fetch(url, sha256, cache, opts, &mut |done, total| {
        if let Some(t) = total {
            bar.set_length(t);
        }
        bar.set_position(done);
    })
    .with_context(|| format!("cannot fetch {url}"))?;
    bar.finish_and_clear();
    if json {
        emitln!("{}", serde_json::json!({ "package": installed, "sha256": sha256 }));
    } else {
        emitln!("{}", installed.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn open(path: &std::path::Path) -> Result<Package> {
    Package::open(path).with_context(|| format!("cannot read package {}", path.display()))
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Convert(args) => convert(args),
        Command::Inspect { package, json, mil } => inspect(&package, json, mil),
        Command::Predict { package, calls, function, json } => predict(&package, &calls, function.as_deref(), json),
        Command::Run(args) => match args.prompt.clone() {
            Some(prompt) => run_text(args, prompt),
            None => run_ids(args),
        },
        Command::Chat { package, system, max_new_tokens, sampling, template, backend } => {
            chat(&package, system, max_new_tokens, sampling, template, backend)
        }
        Command::Eval { package, text, window, max_tokens, json } => eval(&package, &text, window, max_tokens, json),
        Command::Compress { input, output, compress: args, calibrate, calibration_tokens, write, json } => {
            let calibration = calibrate.as_ref().map(|text| (text, calibration_tokens));
            compress(&input, &output, &args, calibration, &write, json)
        }
        Command::Bundle { path, output, verify, force, json } => bundle(&path, output.as_deref(), verify, force, json),
        Command::Fetch { url, sha256, output, max_size, timeout, json } => {
            let opts =
                corelm_runtime::fetch::FetchOptions { max_size, timeout: std::time::Duration::from_secs(timeout) };
            fetch(&url, &sha256, &output, &opts, json)
        }
        Command::Verify { package, against, text, max_tokens, positions, json } => {
            verify(&package, &against, text, max_tokens, positions, json)
        }
        Command::Plan { source, device, context, quantize, json } => plan(&source, device, context, quantize, json),
        Command::Validate { packages, json } => validate(&packages, json),
    }
}

fn inspect(package: &std::path::Path, json: bool, mil: bool) -> Result<ExitCode> {
    let pkg = open(package)?;
    if mil {
        emit!("{}", program_text(&pkg.model().program));
        return Ok(ExitCode::SUCCESS);
    }
    let report = Report::new(&pkg)?;
    if json {
        emitln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        emit!("{report}");
    }
    Ok(if report.issues.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn predict(package: &std::path::Path, calls: &std::path::Path, function: Option<&str>, json: bool) -> Result<ExitCode> {
    let pkg = open(package)?;
    let interp = Interpreter::load(&pkg).with_context(|| format!("cannot run {}", package.display()))?;
    let text = std::fs::read(calls).with_context(|| format!("cannot read {}", calls.display()))?;
    let calls_json: serde_json::Value =
        serde_json::from_slice(&text).with_context(|| format!("{}: not valid JSON", calls.display()))?;
    let list =
        calls_json.as_array().ok_or_else(|| anyhow::anyhow!("{}: expected a JSON list of calls", calls.display()))?;
    let mut state = interp.new_state(function)?;
    let mut results = Vec::new();
    for (i, call) in list.iter().enumerate() {
        let inputs =
            corelm_interp::json::inputs_from_json(call).with_context(|| format!("{}: call {i}", calls.display()))?;
        let out = interp.predict(function, &inputs, &mut state).with_context(|| format!("call {i}"))?;
        results.push(corelm_interp::json::outputs_to_json(&out));
    }
    let out = serde_json::Value::Array(results);
    emitln!("{}", if json { serde_json::to_string(&out)? } else { serde_json::to_string_pretty(&out)? });
    Ok(ExitCode::SUCCESS)
}

/// `run --ids`: greedy decoding from token ids, with timings.
fn run_ids(args: RunArgs) -> Result<ExitCode> {
    let RunArgs { package, ids, max_new_tokens, sampling, logits, json, ignore_eos, backend, .. } = args;
    if sampling.temperature != 0.0 {
        anyhow::bail!("--ids decodes greedily; use --prompt for sampling");
    }
    let pkg = open(&package)?;
    let mut lm = backend.open_backend(&pkg).with_context(|| format!("cannot run {}", package.display()))?;
    let eos = if ignore_eos { vec![] } else { corelm_runtime::model::eos_ids(&pkg) };
    // Greedy, through the sampler: the lowest id among the largest logits, and NaN
    // logits an error rather than a token.
    let mut greedy = corelm_runtime::sampler::Sampler::new(Default::default());
    let started = std::time::Instant::now();
    let last = lm.feed_last(&ids)?;
    let prefill_s = started.elapsed().as_secs_f64();
    let mut next = greedy.sample(&last, &[])?;
    let mut generated = Vec::new();
    let mut stop = "max_new_tokens";
    let decode_started = std::time::Instant::now();
    for i in 0..max_new_tokens {
        // As with --prompt, the end-of-sequence token ends generation and is not listed.
        if eos.contains(&next) {
            stop = "eos";
            break;
        }
        generated.push(next);
        if i + 1 == max_new_tokens {
            break;
        }
        if lm.position() >= lm.context() {
            stop = "context";
            break;
        }
        next = greedy.sample(&lm.feed_last(&[next])?, &[])?;
    }
    let decode_s = decode_started.elapsed().as_secs_f64();
    if json {
        let mut out = serde_json::json!({
            "prompt_ids": ids,
            "generated_ids": generated,
            "stop_reason": stop,
            "prefill_seconds": prefill_s,
            "decode_seconds": decode_s,
        });
        if logits {
            out["logits"] = serde_json::json!(last);
        }
        emitln!("{}", serde_json::to_string(&out)?);
    } else {
        emitln!("{}", generated.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(","));
        eprintln!(
            "prefill {} tokens in {:.2} s, decode {} tokens in {:.2} s",
            ids.len(),
            prefill_s,
            generated.len().saturating_sub(1),
            decode_s
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn validate(packages: &[PathBuf], json: bool) -> Result<ExitCode> {
    let mut results = Vec::new();
    let mut failed = false;
    for path in packages {
        let (issues, error) = match Package::open(path) {
            Ok(pkg) => (pkg.validate().iter().map(|i| i.to_string()).collect::<Vec<_>>(), None),
            Err(e) => (vec![], Some(e.to_string())),
        };
        failed |= error.is_some() || !issues.is_empty();
        if !json {
            match (&error, issues.is_empty()) {
                (Some(e), _) => eprintln!("{}: error: {e}", path.display()),
                (None, true) => emitln!("{}: valid", path.display()),
                (None, false) => {
                    emitln!("{}: {} problem(s)", path.display(), issues.len());
                    for i in &issues {
                        emitln!("  {i}");
                    }
                }
            }
        }
        results.push(serde_json::json!({
            "path": path.display().to_string(),
            "valid": error.is_none() && issues.is_empty(),
            "error": error,
            "issues": issues,
        }));
    }
    if json {
        emitln!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn plan(
    source: &std::path::Path,
    device: Option<String>,
    context: Option<usize>,
    quantize: Option<String>,
    json: bool,
) -> Result<ExitCode> {
    use corelm_deploy::{devices, Quant};
    let model = corelm_deploy::open(source).with_context(|| format!("cannot plan {}", source.display()))?;
    let scheme = quantize.as_deref().map(|q| Quant::parse(q).expect("clap checks the scheme names"));
    let chosen: Vec<&'static corelm_deploy::Device> = match &device {
        None => devices::DEVICES.iter().collect(),
        Some(name) => {
            let found = devices::find(name);
            if found.is_empty() {
                let names: Vec<&str> = devices::DEVICES.iter().map(|d| d.name).collect();
                anyhow::bail!("no device matches `{name}`; devices: {}", names.join(", "));
            }
            found
        }
    };
    let plan = corelm_deploy::plan(&model, scheme, context, &chosen, &corelm_deploy::Assumptions::default())?;
    if json {
        emitln!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        emit!("{}", plan.to_text());
    }
    Ok(ExitCode::SUCCESS)
}

/// The interpreter allocates and frees activations of megabytes every op. By default glibc hands
/// such blocks back to the kernel on free (munmap, with a TLB shootdown on every core) and
/// zero-fills fresh pages on the next allocation: about a sixth of a prefill's time. Keeping
/// freed memory in the process instead costs nothing the process will not reuse.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() -> ExitCode {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    keep_freed_memory();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

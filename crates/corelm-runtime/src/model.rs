//! A package opened for text generation: its backend, tokenizer, chat template and EOS ids.

use corelm_contract::driver::LanguageModel;
use corelm_contract::keys;
use corelm_format::Package;

use crate::chat::{ChatTemplate, Message, TemplateArgs, TOKENIZER_CONFIG_PATH};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

pub struct TextModel {
    pub backend: LanguageModel,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    pub eos_ids: Vec<u32>,
}

/// A package (with its sibling parts) on the reference interpreter, as a generation backend.
#[cfg(feature = "interpreter")]
pub fn reference_backend(pkg: &Package) -> Result<LanguageModel> {
    LanguageModel::open(pkg, corelm_interp::Interpreter::load)
}

/// A package on Core ML (Apple platforms): compiled once into `cache_dir`, driven like the
/// reference interpreter (same interface detection, chunking and masks).
#[cfg(target_vendor = "apple")]
pub fn coreml_backend(
    pkg: &Package,
    units: crate::coreml::ComputeUnits,
    cache_dir: &std::path::Path,
) -> Result<LanguageModel> {
    LanguageModel::open(pkg, |p| crate::coreml::CoreMlExecutor::open(p, units, cache_dir))
}

impl TextModel {
    /// Opens a package on the reference interpreter.
    #[cfg(feature = "interpreter")]
    pub fn open_reference(pkg: &Package) -> Result<TextModel> {
        Self::with_backend(pkg, reference_backend(pkg)?)
    }

    /// Opens a package on Core ML (see [`coreml_backend`]).
    #[cfg(target_vendor = "apple")]
    pub fn open_coreml(
        pkg: &Package,
        units: crate::coreml::ComputeUnits,
        cache_dir: &std::path::Path,
    ) -> Result<TextModel> {
        Self::with_backend(pkg, coreml_backend(pkg, units, cache_dir)?)
    }

    pub fn with_backend(pkg: &Package, backend: LanguageModel) -> Result<TextModel> {
        // A split model's tokenizer and chat template travel with its first part.
        let first = corelm_contract::interface::chunk_packages(pkg)?.map(|mut parts| parts.remove(0));
        let pkg = first.as_ref().unwrap_or(pkg);
        let tokenizer = Tokenizer::from_package(pkg)?;
        let config = pkg.path().join(TOKENIZER_CONFIG_PATH);
        let template = if config.is_file() { ChatTemplate::from_tokenizer_config(&config)? } else { None };
        Ok(TextModel { backend, tokenizer, template, eos_ids: eos_ids(pkg) })
    }

    /// Token ids for a conversation, through the chat template, ready for the reply.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        self.chat_prompt_with(messages, &TemplateArgs { add_generation_prompt: true, ..TemplateArgs::default() })
    }

    /// [`chat_prompt`](Self::chat_prompt) with tools and template variables.
    pub fn chat_prompt_with(&self, messages: &[Message], args: &TemplateArgs) -> Result<Vec<u32>> {
        let template = self
            .template
            .as_ref()
            .ok_or_else(|| Error::invalid("the package has no chat template; pass the prompt as raw text instead"))?;
        let text = template.render_with(messages, args)?;
        // The template already places BOS and other special tokens.
        self.tokenizer.encode(&text, false)
    }
}

/// The end-of-sequence ids a package declares (`corelm.eos_token_ids`); none when it declares none.
pub fn eos_ids(pkg: &Package) -> Vec<u32> {
    pkg.model()
        .description
        .metadata
        .user_defined
        .get(keys::EOS_TOKEN_IDS)
        .map(|s| s.split(',').filter_map(|t| t.trim().parse().ok()).collect())
        .unwrap_or_default()
}

//! `tritter`: export trained models and generate with them.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tritter::device::{run_on, BackendJob, DeviceKind};
use tritter::export::{check_out_path, export_model, write_random_export, BitLinearTensors};
use tritter::infer::budget;
use tritter::infer::kv_bench::{bench_kv_cache, KvBenchShape};
use tritter::infer::{
    generate,
    generate::check_context,
    load::{check_latent_fits, latent_bytes},
    load_model_file, ByteSize, KvCacheType, ModelFile, PlanRequest, Sampler, SamplingConfig,
    StreamStats, StreamingEngine,
};
use tritter::tokenizer::Tokenizer;
use tritter::train::load_checkpoint_model;
use tritter::train::recipe::{InferenceSection, TrainRecipe};
use tritter::TritterConfig;
use tritter_data::{error::at_least_one, rss};
use tritter_kernels::packed::{cpu_gemm, interleave, panel_words, Codes, HostWords};
use tritter_kernels::TritterBackend;

#[derive(Parser)]
#[command(
    name = "tritter",
    version,
    about = "Export and run ternary Tritter models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Export a run's newest checkpoint (or a `model-N.mpk`) to packed safetensors.
    Export {
        checkpoint: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate text from an exported model, streaming tokens to stdout. The packed
    /// engine plans the model into the budget (`--memory-budget`; on the CPU, by default,
    /// the memory available) and streams layer groups when it does not fit (or always,
    /// with `--stream`).
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, required_unless_present = "prompts")]
        prompt: Option<String>,
        /// JSON lines, each a string or an object with a `prompt` field: generated
        /// together, one completion per line on stdout.
        #[arg(long, alias = "batch-file", conflicts_with = "prompt")]
        prompts: Option<PathBuf>,
        /// Bytes the engine may hold on the device, e.g. `2GiB` (default: on the CPU, the
        /// memory available; on a GPU, no limit).
        #[arg(long)]
        memory_budget: Option<ByteSize>,
        /// Generate with the training model on latent f32 weights instead of the packed
        /// engine: the quantization-aware forward, which quantizes every weight on every
        /// step, and holds 16 times the packed codes. The reference the engine is checked
        /// against; slow.
        #[arg(long, conflicts_with_all = ["prompts", "memory_budget", "layer_group_size", "stream", "drop_page_cache", "kv_cache"])]
        latent: bool,
        /// Layers per streamed group (default: the largest that fits twice).
        #[arg(long)]
        layer_group_size: Option<usize>,
        /// A training recipe whose `[inference]` section (`gpu_memory_budget`,
        /// `layer_group_size`, `kv_cache`) and `device` apply where no flag is given.
        #[arg(long)]
        recipe: Option<PathBuf>,
        /// Stream layer groups even when the whole model fits.
        #[arg(long)]
        stream: bool,
        /// Drop the model file's pages from the OS page cache once used, so that each
        /// pass reads the layers from storage and the file does not fill the page cache
        /// (which a container's memory limit counts).
        #[arg(long)]
        drop_page_cache: bool,
        /// KV cache storage: f32 (the default), f16, or int4 (KIVI: 4-bit codes in host
        /// memory, the most recent 128 tokens in f16).
        #[arg(long)]
        kv_cache: Option<KvCacheType>,
        /// Prompt tokens per sequence processed at once.
        #[arg(long, default_value_t = 256, value_parser = at_least_one)]
        prefill_chunk: usize,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// 0 is greedy.
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        temperature: f32,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long)]
        top_p: Option<f32>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// `cpu` (the default), `cuda` or `wgpu`.
        #[arg(long)]
        device: Option<String>,
    },
    /// Print the memory plan of a model (or a preset) under a budget; fails when it does
    /// not fit, naming what exceeds the budget.
    Plan {
        #[arg(long, required_unless_present_any = ["preset", "recipe"], conflicts_with = "preset")]
        model: Option<PathBuf>,
        /// A size preset instead of a model file (`test`, `125M`, … `70B`).
        #[arg(long)]
        preset: Option<String>,
        /// Vocabulary size with `--preset` (264: the byte tokenizer).
        #[arg(long, default_value_t = 264)]
        vocab_size: usize,
        /// A training recipe: its model when neither `--model` nor `--preset` is given,
        /// and its `[inference]` section and `device` where no flag is given.
        #[arg(long)]
        recipe: Option<PathBuf>,
        /// Required unless the recipe's `[inference]` has `gpu_memory_budget`.
        #[arg(long)]
        memory_budget: Option<ByteSize>,
        /// Tokens per sequence (prompt + new tokens); 2048 unless the model's
        /// `max_seq_len` is shorter.
        #[arg(long)]
        context: Option<usize>,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// f32, f16 (the default) or int4.
        #[arg(long)]
        kv_cache: Option<KvCacheType>,
        #[arg(long)]
        layer_group_size: Option<usize>,
        #[arg(long, default_value_t = 256, value_parser = at_least_one)]
        prefill_chunk: usize,
        /// The backend whose kernels' scratch memory to count (default: cpu).
        #[arg(long)]
        device: Option<String>,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Streaming against resident generation: a random-weight model `--ratio` times the
    /// budget, batch 1 and batch 16, streamed with the file in the page cache and from
    /// storage (its pages dropped from the page cache after use), on the CPU or, with
    /// `--device cuda|wgpu`, on a GPU with the host-to-device bandwidth as the limit.
    Streaming {
        /// Preset of the random model (byte vocabulary).
        #[arg(long, default_value = "3B")]
        preset: String,
        /// Override the preset's key/value heads (grouped-query attention).
        #[arg(long, default_value = "2")]
        num_kv_heads: Option<usize>,
        #[arg(long, default_value = "f16")]
        kv_cache: KvCacheType,
        #[arg(long, default_value_t = 4, value_parser = at_least_one)]
        prefill_chunk: usize,
        /// Model bytes ÷ memory budget.
        #[arg(long, default_value_t = 4.0, allow_negative_numbers = true, value_parser = positive_ratio)]
        ratio: f64,
        #[arg(long, default_value_t = 8, value_parser = at_least_one)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 16, value_parser = at_least_one)]
        new_tokens: usize,
        #[arg(long, value_delimiter = ',', default_value = "1,16", value_parser = at_least_one)]
        batches: Vec<usize>,
        /// Where to write the random model (default: a temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// `cpu`, `cuda` or `wgpu`.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// One layer's decode attention on the CPU against a cache of each length, stored in
    /// f32, f16 and INT4 (default shape: 7B's attention, 32 heads, 8 kv heads, dim 128).
    KvCache {
        #[arg(long, default_value_t = 32, value_parser = at_least_one)]
        num_heads: usize,
        #[arg(long, default_value_t = 8, value_parser = at_least_one)]
        num_kv_heads: usize,
        #[arg(long, default_value_t = 128, value_parser = at_least_one)]
        head_dim: usize,
        #[arg(long, value_delimiter = ',', default_value = "4096,32768,131072", value_parser = at_least_one)]
        contexts: Vec<usize>,
        /// Timed calls per storage (the median is reported).
        #[arg(long, default_value_t = 5, value_parser = at_least_one)]
        iters: usize,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Export { checkpoint, out } => {
            check_out_path(&out)?;
            let device = Default::default();
            let (model, tokenizer, run_dir) =
                load_checkpoint_model::<burn::backend::Flex>(&checkpoint, &device)?;
            let tokenizer_json = match &tokenizer {
                tritter_data::TokenizerSpec::HuggingFace(_) => {
                    let path = run_dir.join("tokenizer.json");
                    Some(
                        std::fs::read_to_string(&path)
                            .with_context(|| format!("reading {}", path.display()))?,
                    )
                }
                tritter_data::TokenizerSpec::Byte => None,
            };
            let bytes = export_model(&model, &tokenizer, tokenizer_json.as_deref(), &out)?;
            let c = &model.config;
            println!(
                "wrote {} ({bytes} bytes): {} ternary weights packed in {} bytes, {} full-precision bytes",
                out.display(),
                c.ternary_parameter_count(),
                c.packed_size_bytes(),
                c.high_precision_bytes()
            );
        }
        Command::Generate {
            model,
            prompt,
            prompts,
            memory_budget,
            layer_group_size,
            latent,
            recipe,
            stream,
            drop_page_cache,
            kv_cache,
            prefill_chunk,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            device,
        } => {
            let from_recipe = RecipeDefaults::read(recipe.as_deref())?;
            let InferenceSection {
                gpu_memory_budget: memory_budget,
                layer_group_size,
                kv_cache,
            } = from_recipe.under(memory_budget, layer_group_size, kv_cache);
            let kv_cache = kv_cache.unwrap_or(KvCacheType::F32);
            let device = from_recipe.device(device);
            let sampling = SamplingConfig {
                temperature,
                top_k,
                top_p,
                seed,
            };
            sampling.check()?;
            let prompts = match (&prompt, &prompts) {
                (Some(p), _) => vec![p.clone()],
                (None, Some(file)) => read_prompts(file)?,
                (None, None) => unreachable!("clap requires one"),
            };
            let device = DeviceKind::parse(&device)?;
            if latent {
                let job = GenerateJob {
                    model: &model,
                    prompt: &prompts[0],
                    max_new: max_new_tokens,
                    sampling,
                    host_is_device: device == DeviceKind::Cpu,
                };
                return run_on(device, job);
            }
            let budget = match (memory_budget, device) {
                (Some(b), _) => Budget::Given(b.0),
                (None, DeviceKind::Cpu) => match rss::available() {
                    Some(bytes) => Budget::Available(bytes),
                    None => Budget::Unlimited,
                },
                (None, _) => Budget::Unlimited,
            };
            // Streaming's groups are sized within a budget: on the CPU the memory
            // available serves, a GPU needs one given.
            if matches!(budget, Budget::Unlimited) {
                let flag = match (stream, layer_group_size) {
                    (true, _) => Some("--stream"),
                    (false, Some(_)) => Some("--layer-group-size"),
                    (false, None) => None,
                };
                if let Some(flag) = flag {
                    bail!(
                        "{flag} needs --memory-budget {}",
                        match device {
                            DeviceKind::Cpu => "where the memory available is unknown",
                            _ => "on a GPU",
                        }
                    );
                }
            }
            let job = EngineJob {
                model: &model,
                prompts,
                batch_file: prompt.is_none(),
                max_new: max_new_tokens,
                sampling,
                budget,
                layer_group_size,
                stream,
                drop_page_cache,
                kv_cache,
                prefill_chunk,
                host_is_device: device == DeviceKind::Cpu,
            };
            run_on(device, job)?;
        }
        Command::Plan {
            model,
            preset,
            vocab_size,
            recipe,
            memory_budget,
            context,
            batch,
            kv_cache,
            layer_group_size,
            prefill_chunk,
            device,
        } => {
            let from_recipe = RecipeDefaults::read(recipe.as_deref())?;
            let (config, what) = match (&model, &preset, (&recipe, &from_recipe.0)) {
                (Some(path), _, _) => (ModelFile::open(path)?.config, path.display().to_string()),
                (None, Some(name), _) => (
                    TritterConfig::preset(name, vocab_size)?,
                    format!("preset {name}"),
                ),
                (None, None, (Some(path), Some(recipe))) => (
                    recipe.model_config(vocab_size)?,
                    format!("recipe {}", path.display()),
                ),
                (None, None, _) => unreachable!("clap requires one"),
            };
            let InferenceSection {
                gpu_memory_budget,
                layer_group_size,
                kv_cache,
            } = from_recipe.under(memory_budget, layer_group_size, kv_cache);
            let Some(memory_budget) = gpu_memory_budget else {
                bail!(
                    "no memory budget: give --memory-budget, or a recipe whose [inference] has gpu_memory_budget"
                );
            };
            let kv_cache = kv_cache.unwrap_or(KvCacheType::F16);
            let context = context.unwrap_or(config.max_seq_len.min(2048));
            let device = from_recipe.device(device);
            let request = PlanRequest {
                budget: memory_budget.0,
                context,
                batch,
                kv_cache,
                layer_group_size,
                stream: false,
                prefill_chunk,
            };
            let memory = match DeviceKind::parse(&device)? {
                DeviceKind::Cpu => budget::DeviceMemory::of::<burn::backend::Flex>(),
                // CUDA and wgpu run one CubeCL implementation of the backend's
                // kernels, so wgpu's type gives the plan `generate` makes on either.
                _ => budget::DeviceMemory::of::<burn::backend::Wgpu>(),
            };
            let plan = budget::plan(&config, &request, memory)
                .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
            println!(
                "{what}: {} layers, {} ternary weights ({} packed), {} tokens × batch {}",
                config.num_layers,
                config.ternary_parameter_count(),
                ByteSize(config.packed_size_bytes() as u64),
                context,
                batch
            );
            println!("{plan}");
            if plan.streaming {
                println!(
                    "streaming: {} groups of {} layers; each pass {} {} of layers",
                    plan.num_groups,
                    plan.layer_group_size,
                    if memory.in_place {
                        "brings into memory"
                    } else {
                        "moves to the device"
                    },
                    ByteSize(plan.layer_bytes * config.num_layers as u64)
                );
            } else {
                println!("resident: every layer stays on the device");
            }
        }
        Command::Bench {
            bench:
                Bench::Streaming {
                    preset,
                    num_kv_heads,
                    kv_cache,
                    prefill_chunk,
                    ratio,
                    prompt_tokens,
                    new_tokens,
                    batches,
                    dir,
                    device,
                },
        } => {
            let mut config = TritterConfig::preset(&preset, 264)?;
            if let Some(kv) = num_kv_heads {
                config.num_kv_heads = kv;
                config.validate()?;
            }
            let shape = StreamingBench {
                name: format!("{preset} (kv heads {})", config.num_kv_heads),
                config,
                kv_cache,
                prefill_chunk,
                ratio,
                prompt_tokens,
                new_tokens,
            };
            let kind = DeviceKind::parse(&device)?;
            run_on(
                kind,
                StreamingBenchJob {
                    shape: &shape,
                    batches: &batches,
                    dir,
                    kind,
                },
            )?
        }
        Command::Bench {
            bench:
                Bench::KvCache {
                    num_heads,
                    num_kv_heads,
                    head_dim,
                    contexts,
                    iters,
                },
        } => {
            let shape = KvBenchShape {
                num_heads,
                num_kv_heads,
                head_dim,
            };
            shape.check()?;
            println!(
                "decode attention, one layer: {num_heads} heads, {num_kv_heads} kv heads, head dim {head_dim}; CPU, {} threads",
                rayon::current_num_threads()
            );
            println!(
                "{:>8} {:>8} {:>11} {:>10} {:>9}",
                "context", "storage", "cache MiB", "ms/call", "GB/s"
            );
            let device = burn::backend::flex::FlexDevice;
            for row in bench_kv_cache::<burn::backend::Flex>(shape, &contexts, iters, &device)? {
                for (storage, secs, bytes) in &row.timings {
                    println!(
                        "{:>8} {:>8} {:>11.1} {:>10.3} {:>9.2}",
                        row.context,
                        storage,
                        *bytes as f64 / (1 << 20) as f64,
                        secs * 1e3,
                        *bytes as f64 / secs / 1e9
                    );
                }
                println!(
                    "{:>8} int4 relative L2 error against f32 {:.4}; quantized {:.0} tokens/s",
                    row.context, row.int4_error, row.quantize_tokens_per_sec
                );
            }
        }
    }
    Ok(())
}

/// A ratio above 0, for clap.
fn positive_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        Ok(_) => Err("expected a finite number above 0".into()),
        Err(e) => Err(format!("{e}")),
    }
}

/// `<bos> <code>` and the prompt's tokens.
fn prompt_ids(tokenizer: &dyn Tokenizer, prompt: &str) -> Vec<u32> {
    let mut ids: Vec<u32> = tokenizer
        .bos()
        .into_iter()
        .chain(tokenizer.code_marker())
        .collect();
    ids.extend(tokenizer.encode(prompt.as_bytes()));
    ids
}

/// Writes generated text as tokens come, whole decoded bytes at a time.
#[derive(Default)]
struct TextPrinter {
    generated: Vec<u32>,
    printed: usize,
}

impl TextPrinter {
    fn push(&mut self, token: u32, tokenizer: &dyn Tokenizer, out: &mut impl Write) {
        self.generated.push(token);
        let text = tokenizer.decode(&self.generated);
        if text.len() > self.printed {
            let _ = out.write_all(&text[self.printed..]);
            let _ = out.flush();
            self.printed = text.len();
        }
    }
}

/// What `--recipe` contributes to `generate` and `plan`: its `[inference]` section and
/// its device, each used where no flag is given.
#[derive(Default)]
struct RecipeDefaults(Option<TrainRecipe>);

impl RecipeDefaults {
    fn read(path: Option<&Path>) -> Result<Self> {
        path.map(TrainRecipe::from_file)
            .transpose()
            .map(Self)
            .map_err(Into::into)
    }

    /// The settings the flags give, else the recipe's.
    fn under(
        &self,
        memory_budget: Option<ByteSize>,
        layer_group_size: Option<usize>,
        kv_cache: Option<KvCacheType>,
    ) -> InferenceSection {
        let flags = InferenceSection {
            gpu_memory_budget: memory_budget,
            layer_group_size,
            kv_cache,
        };
        flags.or(self.0.as_ref().map(|r| r.inference).unwrap_or_default())
    }

    /// `--device`, else the recipe's, else the CPU.
    fn device(&self, flag: Option<String>) -> String {
        flag.or_else(|| self.0.as_ref().map(|r| r.device.clone()))
            .unwrap_or_else(|| "cpu".into())
    }
}

/// Prompts from JSON lines: a string, or an object with a `prompt` field.
fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        let prompt = match &value {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Object(o) => match o.get("prompt") {
                Some(serde_json::Value::String(s)) => s.clone(),
                _ => bail!(
                    "{}:{}: expected an object with a string `prompt`",
                    path.display(),
                    i + 1
                ),
            },
            _ => bail!(
                "{}:{}: expected a string or an object with `prompt`",
                path.display(),
                i + 1
            ),
        };
        prompts.push(prompt);
    }
    if prompts.is_empty() {
        bail!("{} holds no prompts", path.display());
    }
    Ok(prompts)
}

/// Where the engine's budget comes from.
#[derive(Clone, Copy)]
enum Budget {
    /// `--memory-budget` or the recipe's `gpu_memory_budget`.
    Given(u64),
    /// No budget given, on the CPU: the memory available (`MemAvailable`).
    Available(u64),
    /// No budget given, on a GPU.
    Unlimited,
}

impl Budget {
    fn bytes(self) -> u64 {
        match self {
            Budget::Given(b) | Budget::Available(b) => b,
            Budget::Unlimited => u64::MAX,
        }
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Budget::Given(b) => write!(f, "a {} budget", ByteSize(*b)),
            Budget::Available(b) => write!(f, "the {} of memory available", ByteSize(*b)),
            Budget::Unlimited => write!(f, "no budget"),
        }
    }
}

struct EngineJob<'a> {
    model: &'a Path,
    prompts: Vec<String>,
    batch_file: bool,
    max_new: usize,
    sampling: SamplingConfig,
    budget: Budget,
    layer_group_size: Option<usize>,
    stream: bool,
    drop_page_cache: bool,
    kv_cache: KvCacheType,
    prefill_chunk: usize,
    /// The device's memory is the host's (the CPU backend), so the budget bounds the
    /// process's resident set; on a GPU it bounds device memory, which the engine counts.
    host_is_device: bool,
}

impl BackendJob for EngineJob<'_> {
    type Output = ();
    fn run<B: TritterBackend>(self, device: B::Device) -> Result<()> {
        let baseline = rss::reset_peak();
        // Opened once, for the tokenizer and the engine. Opening checks the structure;
        // each tensor is verified as it is first read (a streamed model by its first pass).
        let file = std::sync::Arc::new(ModelFile::open(self.model)?);
        file.set_drop_page_cache(self.drop_page_cache);
        let tokenizer = file.tokenizer()?;
        let ids: Vec<Vec<u32>> = self
            .prompts
            .iter()
            .map(|p| prompt_ids(tokenizer.as_ref(), p))
            .collect();
        let longest = ids.iter().map(Vec::len).max().unwrap_or(0);
        check_context(longest, self.max_new, file.config.max_seq_len)?;
        let request = PlanRequest {
            budget: self.budget.bytes(),
            context: longest + self.max_new,
            batch: ids.len(),
            kv_cache: self.kv_cache,
            layer_group_size: self.layer_group_size,
            stream: self.stream,
            prefill_chunk: self.prefill_chunk,
        };
        let mut engine = StreamingEngine::<B>::from_file(file, request, device).map_err(|e| {
            match self.budget {
                Budget::Available(_) => {
                    e.context(format!("no --memory-budget: planned into {}", self.budget))
                }
                _ => e,
            }
        })?;
        let plan = &engine.plan;
        match self.budget {
            Budget::Given(_) => eprintln!("{plan}"),
            _ if plan.streaming => eprintln!("{plan}"),
            _ => {}
        }
        if !matches!(self.budget, Budget::Given(_)) {
            eprintln!(
                "packed engine, planned into {} (--memory-budget sets one)",
                self.budget
            );
        }
        eprintln!(
            "{}",
            if plan.streaming {
                format!(
                    "streaming {} groups of {} layers",
                    plan.num_groups, plan.layer_group_size
                )
            } else {
                "every layer resident".to_string()
            }
        );
        if self.drop_page_cache {
            eprintln!("the model file's pages leave the page cache once used: each pass reads the layers from storage");
        }
        let mut stdout = std::io::stdout().lock();
        let single = !self.batch_file;
        if single {
            stdout.write_all(self.prompts[0].as_bytes())?;
            stdout.flush()?;
        }
        let mut printer = TextPrinter::default();
        // A batch prints its completions at the end: meanwhile, a bar on a terminal.
        let progress = batch_progress(!single, ids.len(), self.max_new);
        let out = engine.generate(
            &ids,
            self.max_new,
            &self.sampling,
            Some(tokenizer.eos()),
            false,
            |_, t| {
                if single {
                    printer.push(t, tokenizer.as_ref(), &mut stdout);
                } else {
                    if progress.position() == 0 {
                        progress.set_message("decoding");
                    }
                    progress.inc(1);
                }
            },
        );
        progress.finish_and_clear();
        let out = out?;
        if single {
            writeln!(stdout)?;
        } else {
            for (i, (prompt, tokens)) in self.prompts.iter().zip(&out.tokens).enumerate() {
                let line = serde_json::json!({
                    "id": i,
                    "prompt": prompt,
                    "completion": String::from_utf8_lossy(&tokenizer.decode(tokens)),
                });
                writeln!(stdout, "{line}")?;
            }
        }
        eprintln!("{}", out.stats);
        if let (Some(base), Some(peak)) = (baseline, rss::peak()) {
            let engine = ByteSize(peak.saturating_sub(base));
            if self.host_is_device {
                eprintln!(
                    "resident set: {} at start, peak {} (engine: {engine}{})",
                    ByteSize(base),
                    ByteSize(peak),
                    match self.budget {
                        Budget::Given(b) => format!(" of a {} budget", ByteSize(b)),
                        budget => format!(", {budget}"),
                    }
                );
            } else {
                // The device runtime's own host memory (driver, shader compiler, staging)
                // is not device memory; the budget bounds the "held" figure above.
                eprintln!(
                    "host resident set: {} at start, peak {} (engine and device runtime: \
                     {engine}; the budget bounds the peak held on the device, above)",
                    ByteSize(base),
                    ByteSize(peak),
                );
            }
            eprintln!("engine-peak-rss-bytes {}", peak.saturating_sub(base));
        }
        Ok(())
    }
}

/// Progress of a batch's generation on stderr, drawn only where stderr is a terminal:
/// tokens generated of at most `batch × max_new` (sequences that reach EOS end early),
/// their rate, and the phase (the prompts' prefill, then decoding). The clock ticks on
/// its own, since a streamed pass over a large model can take seconds per token.
fn batch_progress(enabled: bool, batch: usize, max_new: usize) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new((batch * max_new) as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "generating [{bar:24}] {pos}/{len} tokens ({rate}) {msg} {elapsed_precise}",
        )
        .expect("valid template")
        .with_key(
            "rate",
            |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.1} tokens/s", state.per_sec());
            },
        )
        .progress_chars("=> "),
    );
    bar.set_message(format!("prefilling {batch} prompts"));
    bar.enable_steady_tick(std::time::Duration::from_millis(250));
    bar
}

/// The model's FFN up-projection shape `(d_out, d_in)`, the largest packed matrix, and
/// synthetic codes for it as the export stores them.
fn up_projection(config: &TritterConfig) -> (usize, usize, Vec<u8>) {
    let (d_in, d_out) = (config.hidden_size, 2 * config.ffn_size);
    let packed = (0..d_out * d_in.div_ceil(4))
        .map(|i| (i % 81) as u8 & 0x55)
        .collect();
    (d_out, d_in, packed)
}

/// Bandwidth of the loader's rearrangement of the export's codes into the CPU layout
/// (on the thread pool), bytes/s, and the rearranged matrix.
fn interleave_bandwidth(d_out: usize, d_in: usize, packed: &[u8]) -> (f64, HostWords) {
    let mut words = HostWords::zeroed(panel_words(d_out, d_in));
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        interleave(std::hint::black_box(packed), d_out, d_in, &mut words);
        best = best.min(start.elapsed().as_secs_f64());
        std::hint::black_box(&words);
    }
    (packed.len() as f64 / best, words)
}

/// Multiply-adds per second of `product(x, i)` (`x`: `tokens` rows) over `[d_out, d_in]` matrices
/// `0..count` in turn (one stays in cache; enough of them are read from memory), best
/// of five rounds.
fn product_rate(
    d_out: usize,
    d_in: usize,
    count: usize,
    tokens: usize,
    product: impl Fn(&[f32], usize) -> Vec<f32>,
) -> f64 {
    let x: Vec<f32> = (0..tokens * d_in)
        .map(|i| ((i * 7919) % 255) as f32 - 127.0)
        .collect();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        for i in 0..count {
            std::hint::black_box(product(&x, i));
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    (d_in * d_out * count * tokens) as f64 / best
}

/// The CPU packed product's rates (G multiply-adds/s) at 1 and 16 tokens: from the CPU
/// layout and in place from the export's rows, each in cache and from memory. Returns the
/// best rate at 16 tokens, multiply-adds/s.
fn print_product_rates(d_out: usize, d_in: usize, packed: &[u8], words: &HostWords) -> f64 {
    // Copies enough to pass through memory rather than the caches; the rows in the
    // pages the CPU layout's are in (2 MiB, where the kernel gives them), as the engine's
    // mapping of the model file is on a filesystem that caches it in large folios.
    let copies = (512usize << 20).div_ceil(packed.len());
    let mut memory = HostWords::zeroed((copies * packed.len()).div_ceil(4));
    for copy in memory.as_bytes_mut().chunks_exact_mut(packed.len()) {
        copy.copy_from_slice(packed);
    }
    let rows: Vec<&[u8]> = memory.as_bytes().chunks_exact(packed.len()).collect();
    let panels: Vec<HostWords> = (0..copies).map(|_| words.clone()).collect();
    println!(
        "packed ternary product, G multiply-adds/s ({d_out} × {d_in}; from memory: {} of matrices)",
        ByteSize((copies * packed.len()) as u64)
    );
    println!(
        "{:>7} {:>18} {:>23} {:>16} {:>21}",
        "tokens",
        "CPU layout, cached",
        "CPU layout, from memory",
        "in place, cached",
        "in place, from memory"
    );
    let mut best = 0.0;
    for tokens in [1, 16] {
        let panel =
            |x: &[f32], i: usize| cpu_gemm(x, tokens, Codes::Panels(&panels[i]), d_out, d_in, 1.0);
        let in_place =
            |x: &[f32], i: usize| cpu_gemm(x, tokens, Codes::Rows(rows[i]), d_out, d_in, 1.0);
        let rates = [
            product_rate(d_out, d_in, 1, tokens, panel),
            product_rate(d_out, d_in, copies, tokens, panel),
            product_rate(d_out, d_in, 1, tokens, in_place),
            product_rate(d_out, d_in, copies, tokens, in_place),
        ];
        let g = 1e-9;
        println!(
            "{tokens:>7} {:>18.1} {:>23.1} {:>16.1} {:>21.1}",
            g * rates[0],
            g * rates[1],
            g * rates[2],
            g * rates[3]
        );
        if tokens == 16 {
            best = rates.into_iter().fold(0.0, f64::max);
        }
    }
    best
}

/// Single-thread copy bandwidth of a buffer far larger than the caches, bytes/s.
fn memcpy_bandwidth() -> f64 {
    let n = 256 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        best = best.min(start.elapsed().as_secs_f64());
        std::hint::black_box(&dst);
    }
    n as f64 / best
}

struct StreamingBench {
    name: String,
    config: TritterConfig,
    kv_cache: KvCacheType,
    prefill_chunk: usize,
    ratio: f64,
    prompt_tokens: usize,
    new_tokens: usize,
}

/// Prefills timed for each row's first-token latency.
const FIRST_TOKEN_SAMPLES: usize = 5;

/// Host-to-device bandwidth through the loader's own path, bytes/s: packed codes moved
/// by `ternary_reupload` into device buffers already allocated, as the loader refills a
/// spent group's, then the device synchronized; enough copies of the `[d_out, d_in]`
/// matrix for 256 MiB a round, best of five rounds.
fn upload_bandwidth<B: TritterBackend>(
    d_out: usize,
    d_in: usize,
    packed: &[u8],
    device: &B::Device,
) -> Result<f64> {
    let copies = (256usize << 20).div_ceil(packed.len());
    let sync = || B::sync(device).map_err(|e| anyhow::anyhow!("device error: {e:?}"));
    let mut buffers: Vec<_> = (0..copies)
        .map(|_| B::ternary_upload(packed, d_out, d_in, 1.0, device))
        .collect();
    sync()?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        buffers = buffers
            .into_iter()
            .map(|b| B::ternary_reupload(b, packed, 1.0, device))
            .collect();
        sync()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok((copies * packed.len()) as f64 / best)
}

/// [`bench_streaming`] on the backend of `kind`.
struct StreamingBenchJob<'a> {
    shape: &'a StreamingBench,
    batches: &'a [usize],
    dir: Option<PathBuf>,
    kind: DeviceKind,
}

impl BackendJob for StreamingBenchJob<'_> {
    type Output = ();
    fn run<B: TritterBackend>(self, device: B::Device) -> Result<()> {
        bench_streaming::<B>(self.shape, self.batches, self.dir, self.kind, device)
    }
}

fn bench_streaming<B: TritterBackend>(
    shape: &StreamingBench,
    batches: &[usize],
    dir: Option<PathBuf>,
    kind: DeviceKind,
    device: B::Device,
) -> Result<()> {
    let StreamingBench {
        name: preset,
        config,
        kv_cache,
        prefill_chunk,
        ratio,
        prompt_tokens,
        new_tokens,
    } = shape;
    let (ratio, prompt_tokens, new_tokens) = (*ratio, *prompt_tokens, *new_tokens);
    let on_cpu = kind == DeviceKind::Cpu;
    let temp = tempfile::tempdir()?;
    let dir = dir.unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("random-model.safetensors");
    let start = Instant::now();
    let bytes = write_random_export(config, 7, &path)?;
    eprintln!(
        "wrote {} ({}) in {:.1} s",
        path.display(),
        ByteSize(bytes),
        start.elapsed().as_secs_f64()
    );
    let budget = (bytes as f64 / ratio) as u64;
    // A budget the streaming rows cannot run in is refused before anything is measured:
    // a small model's layers are small beside the plan's fixed parts.
    let mut smallest = None;
    for &batch in batches {
        let request = PlanRequest {
            budget: u64::MAX,
            context: prompt_tokens + new_tokens,
            batch,
            kv_cache: *kv_cache,
            layer_group_size: Some(1),
            stream: true,
            prefill_chunk: *prefill_chunk,
        };
        let plan = budget::plan(config, &request, budget::DeviceMemory::of::<B>())?;
        if smallest
            .as_ref()
            .is_none_or(|s: &budget::MemoryPlan| plan.total() > s.total())
        {
            smallest = Some(plan);
        }
    }
    if let Some(mut plan) = smallest.filter(|p| p.total() > budget) {
        plan.budget = budget;
        let need = plan.total();
        bail!(
            "preset {preset}: the budget, model ÷ {ratio} = {}, is below the smallest plan that streams it at batch {}, {} with one layer per group; --ratio {:.2} or less runs it\n{plan}",
            ByteSize(budget),
            plan.batch,
            ByteSize(need),
            (bytes as f64 / need as f64 * 100.0).floor() / 100.0
        );
    }
    let file = std::sync::Arc::new(ModelFile::open(&path)?);
    let copy = memcpy_bandwidth();
    // The file comes into the page cache as a first launch brings it, through the
    // engine's mapping (in large folios where the filesystem has them), and is verified
    // once here, so that no row pays for the first pass's verification. This first read
    // also comes before the storage measure: on a virtual disk, the first read of a file
    // just written ran at a third of the rate of every later one (0.76 against 2.6 GB/s
    // with `dd`), a rate no row of the table then meets.
    file.drop_from_page_cache();
    file.verify_all()?;
    let storage = storage_read_bandwidth(&file)?;
    let (d_out, d_in, packed) = up_projection(config);
    // The CPU computes in place from the file's pages; a GPU's limit is the upload.
    let upload = if on_cpu {
        None
    } else {
        Some(upload_bandwidth::<B>(d_out, d_in, &packed, &device)?)
    };
    let threads = rayon::current_num_threads();
    println!(
        "streaming bench: preset {preset}, model {} ({} layers), budget {} (model ÷ {ratio}), prompt {prompt_tokens} + {new_tokens} new tokens, {kv_cache} KV cache, {}",
        ByteSize(bytes),
        config.num_layers,
        ByteSize(budget),
        if on_cpu {
            format!("{threads} threads")
        } else {
            format!("--device {kind}")
        }
    );
    println!(
        "memory copy bandwidth (1 thread): {:.2} GiB/s",
        copy / (1u64 << 30) as f64
    );
    match storage {
        Some(storage) => println!(
            "storage read bandwidth (every layer's codes, out of the page cache, through the engine's mapping, 1 thread): {:.2} GiB/s",
            storage / (1u64 << 30) as f64
        ),
        None => println!(
            "storage read bandwidth: unmeasured, the page cache kept the model file (its filesystem ignores the request to drop it); the storage rows read from memory"
        ),
    }
    let product = match upload {
        None => {
            let (rearrange, words) = interleave_bandwidth(d_out, d_in, &packed);
            println!(
                "rearranging packed codes into the CPU layout ({threads} threads): {:.2} GiB/s",
                rearrange / (1u64 << 30) as f64
            );
            Some(print_product_rates(d_out, d_in, &packed, &words))
        }
        Some(upload) => {
            println!(
                "host-to-device bandwidth (packed codes from host memory into device buffers, through the loader's upload): {:.2} GiB/s",
                upload / (1u64 << 30) as f64
            );
            None
        }
    };
    // The transfers' limit: the upload on a GPU, the copy from memory on the CPU; from
    // storage, the slower of that and the read.
    let link = upload.unwrap_or(copy);
    println!(
        "{:<10} {:>5} {:>6} {:>9} {:>10} {:>11} {:>10} {:>10} {:>8} {:>10} {:>12} {:>9} {:>7}",
        "engine",
        "batch",
        "groups",
        "tokens/s",
        "decode t/s",
        "first tok s",
        "MiB/token",
        "xfer GiB/s",
        "hidden",
        "overlap",
        "xfer/limit",
        "peak MiB",
        "cached"
    );
    let prompts = |batch: usize| -> Vec<Vec<u32>> {
        (0..batch)
            .map(|b| {
                (0..prompt_tokens)
                    .map(|t| (8 + (t * 31 + b * 7) % 256) as u32)
                    .collect()
            })
            .collect()
    };
    let sampling = SamplingConfig::default();
    let request = |budget, batch, context| PlanRequest {
        budget,
        context,
        batch,
        kv_cache: *kv_cache,
        layer_group_size: None,
        stream: false,
        prefill_chunk: *prefill_chunk,
    };
    if !on_cpu {
        // A GPU runtime compiles (and tunes) each kernel for its shapes on first use:
        // one short streamed generation at each batch first, so that no row's figures
        // include compilation.
        for &batch in batches {
            let request = request(budget, batch, prompt_tokens + new_tokens);
            StreamingEngine::<B>::from_file(file.clone(), request, device.clone())?.generate(
                &prompts(batch),
                2,
                &sampling,
                None,
                false,
                |_, _| {},
            )?;
        }
    }
    let mut rows = Vec::new();
    // Resident rows: the same compute with every layer in memory (no transfer).
    // Streaming rows: the file's pages stay in the page cache, as they do for a model
    // that fits the machine's memory but not the budget. Storage rows: every pass reads
    // the layers from storage, as for a model larger than the machine's memory.
    let rows_of = |name| batches.iter().map(move |&b| (name, b));
    for (name, batch) in rows_of("resident")
        .chain(rows_of("streaming"))
        .chain(rows_of("storage"))
    {
        file.set_drop_page_cache(name == "storage");
        let (budget, limit) = match name {
            "resident" => (u64::MAX, link),
            "streaming" => (budget, link),
            _ => (budget, storage.unwrap_or(link).min(link)),
        };
        let request = request(budget, batch, prompt_tokens + new_tokens);
        let mut engine = StreamingEngine::<B>::from_file(file.clone(), request, device.clone())?;
        let groups = engine.plan.num_groups;
        let out = engine.generate(
            &prompts(batch),
            new_tokens,
            &sampling,
            None,
            false,
            |_, _| {},
        )?;
        // One prefill is a short sample (under a tenth of a second at batch 1), which
        // the machine's other work moves by a quarter: the first token is the median of
        // several, each from the same state as the run above: from storage, the engine
        // has dropped every layer it used from the page cache, and holds the first
        // group, prefetched, as a new engine does. (Dropping the file's pages here
        // would unmap that group too, to be faulted back in a page at a time.)
        let mut first = vec![out.stats.first_token_secs];
        for _ in 1..FIRST_TOKEN_SAMPLES {
            let again = engine.generate(&prompts(batch), 1, &sampling, None, false, |_, _| {})?;
            first.push(again.stats.first_token_secs);
        }
        first.sort_by(f64::total_cmp);
        let s = &StreamStats {
            first_token_secs: first[first.len() / 2],
            ..out.stats
        };
        println!(
            "{:<10} {:>5} {:>6} {:>9.2} {:>10.2} {:>11.3} {:>10.1} {:>10.2} {:>7.1}% {:>9.1}% {:>12.2} {:>9.1} {:>6.1}%",
            name,
            batch,
            groups,
            s.tokens_per_sec(),
            s.decode_tokens_per_sec(),
            s.first_token_secs,
            s.bytes_per_token() / (1 << 20) as f64,
            s.transfer_bandwidth() / (1u64 << 30) as f64,
            100.0 * s.overlap(),
            100.0 * s.overlap_efficiency(),
            s.transfer_bandwidth() / limit,
            s.peak_device_bytes as f64 / (1 << 20) as f64,
            100.0 * file.cached_bytes(0..file.len()) as f64 / file.len() as f64
        );
        rows.push((name, batch, s.clone()));
    }
    file.set_drop_page_cache(false);
    println!("first tok s: the median of {FIRST_TOKEN_SAMPLES} prefills; the other columns are from the first run");
    if storage.is_some() && batches.contains(&1) {
        // A cold start, the file out of the page cache (a first launch, or a model larger
        // than the machine's memory): the resident engine reads every layer before its
        // prefill, the streaming engine while its prefill computes. Engine construction
        // through the first token, batch 1, the median of several.
        let cold = |budget: u64, from_storage: bool| -> Result<(f64, f64)> {
            file.set_drop_page_cache(from_storage);
            let mut samples = Vec::with_capacity(FIRST_TOKEN_SAMPLES);
            for _ in 0..FIRST_TOKEN_SAMPLES {
                file.drop_from_page_cache();
                let start = Instant::now();
                let request = request(budget, 1, prompt_tokens + 1);
                let mut engine =
                    StreamingEngine::<B>::from_file(file.clone(), request, device.clone())?;
                let load = start.elapsed().as_secs_f64();
                engine.generate(&prompts(1), 1, &sampling, None, false, |_, _| {})?;
                samples.push((start.elapsed().as_secs_f64(), load));
            }
            file.set_drop_page_cache(false);
            samples.sort_by(|a, b| a.0.total_cmp(&b.0));
            Ok(samples[samples.len() / 2])
        };
        let (resident, load) = cold(u64::MAX, false)?;
        let (streamed, _) = cold(budget, true)?;
        println!(
            "cold start to the first token (batch 1, the file out of the page cache, median of {FIRST_TOKEN_SAMPLES}): resident {resident:.3} s ({load:.3} s of it loading), storage {streamed:.3} s; storage ÷ resident: {:.2}",
            streamed / resident
        );
    }
    let row = |engine: &str, batch: usize| {
        rows.iter()
            .find(|r| r.0 == engine && r.1 == batch)
            .map(|r| &r.2)
    };
    let resident = row("resident", 1);
    // What the machine allows: each generated token needs one multiply-add per ternary
    // weight, which no batch computes faster than the product's best measured rate.
    let weights = config.ternary_parameter_count() as f64;
    let decode_ceiling = product.map(|product| product / weights);
    for engine in ["streaming", "storage"] {
        // At every batch: a larger batch's prefill computes longer behind the same reads.
        let first_token = rows
            .iter()
            .filter(|r| r.0 == engine)
            .filter_map(|(_, batch, s)| {
                let resident = row("resident", *batch)?;
                Some(format!(
                    "{:.2} at batch {batch}",
                    s.first_token_secs / resident.first_token_secs
                ))
            })
            .collect::<Vec<_>>();
        if !first_token.is_empty() {
            println!(
                "first-token latency, {engine} ÷ resident: {}",
                first_token.join(", ")
            );
        }
        let Some(one) = row(engine, 1) else {
            continue;
        };
        for (name, batch, s) in &rows {
            if *name == engine && *batch > 1 {
                let ceiling = decode_ceiling
                    .map(|c| {
                        format!(
                            " (this machine's ceiling: {:.2})",
                            c / one.decode_tokens_per_sec()
                        )
                    })
                    .unwrap_or_default();
                println!(
                    "{engine} batch-{batch} throughput ÷ batch-1: {:.2} overall, {:.2} after the prefill{ceiling}",
                    s.tokens_per_sec() / one.tokens_per_sec(),
                    s.decode_tokens_per_sec() / one.decode_tokens_per_sec(),
                );
            }
        }
    }
    if let (Some(one), Some(resident)) = (
        row("storage", 1).filter(|one| one.transfer_bandwidth() > 0.0),
        resident,
    ) {
        // The first pass reads every layer once, none of them in the page cache.
        let layer_bytes = one.bytes_streamed as f64 / one.passes.max(1) as f64;
        let fastest = storage.unwrap_or(0.0).max(one.transfer_bandwidth());
        let read = layer_bytes / fastest;
        println!(
            "first token from storage needs one read of every layer: about {read:.3} s at {:.2} GiB/s (the fastest read of the file above, on average), {:.2}× the resident engine's first token",
            fastest / (1u64 << 30) as f64,
            read / resident.first_token_secs
        );
    }
    match (product, upload) {
        (Some(product), _) => println!(
            "ceiling on decode tokens/s at any batch: {:.1}, every token's {:.2} G multiply-adds over ternary weights at the packed product's best rate at 16 tokens ({:.1} G/s)",
            product / weights,
            weights * 1e-9,
            product * 1e-9
        ),
        (None, Some(upload)) => {
            // Every streamed pass (one decode step of the whole batch) moves every layer.
            let pass = rows
                .iter()
                .find(|r| r.0 == "streaming")
                .map(|r| r.2.bytes_streamed as f64 / r.2.passes.max(1) as f64)
                .unwrap_or(0.0);
            if pass > 0.0 {
                println!(
                    "ceiling on streamed decode steps/s: {:.1}, each step's {} of layers at the host-to-device bandwidth ({:.2} GiB/s); a step serves every sequence of the batch",
                    upload / pass,
                    ByteSize(pass as u64),
                    upload / (1u64 << 30) as f64
                );
            }
        }
        (None, None) => {}
    }
    Ok(())
}

/// Read bandwidth of the storage under `file`, bytes/s, through the streamed engine's own
/// read path: every layer's packed codes, in the engine's order, brought into the mapping
/// in one request each (`MADV_POPULATE_READ`) and released, on one thread, after the
/// file's pages left the page cache. `None` when they could not be made to leave it.
fn storage_read_bandwidth(file: &ModelFile) -> Result<Option<f64>> {
    file.drop_from_page_cache();
    if file.cached_bytes(0..file.len()) > file.len() / 4 {
        return Ok(None);
    }
    let start = Instant::now();
    let mut total = 0;
    for t in BitLinearTensors::all(&file.config) {
        let name = t.weight();
        let range = file.range(&name)?;
        file.populate(&name);
        // The pages must really be here: one byte of each, read back.
        let bytes = &file.as_ref()[range.clone()];
        let mut sum = 0u8;
        for page in bytes.iter().step_by(4096) {
            sum = sum.wrapping_add(*page);
        }
        std::hint::black_box(sum);
        file.release(&name);
        total += range.len();
    }
    Ok(Some(total as f64 / start.elapsed().as_secs_f64()))
}

struct GenerateJob<'a> {
    model: &'a std::path::Path,
    prompt: &'a str,
    max_new: usize,
    sampling: SamplingConfig,
    /// The model's weights load into host memory (the CPU backend).
    host_is_device: bool,
}

impl BackendJob for GenerateJob<'_> {
    type Output = ();
    fn run<B: TritterBackend>(self, device: B::Device) -> Result<()> {
        // Opening reads the header only: what loading would hold, and whether the prompt
        // leaves room in the context, are known before the weights load.
        let file = ModelFile::open(self.model)?;
        eprintln!(
            "resident on latent f32 weights ({}), the training model's forward; without --latent the packed 2-bit engine runs",
            ByteSize(latent_bytes(&file.config))
        );
        if let (true, Some(available)) = (self.host_is_device, rss::available()) {
            check_latent_fits(&file.config, available)
                .map_err(|e| anyhow::anyhow!("{}: {e}", self.model.display()))?;
        }
        let ids = prompt_ids(file.tokenizer()?.as_ref(), self.prompt);
        check_context(ids.len(), self.max_new, file.config.max_seq_len)?;
        run_generate::<B>(
            &file,
            self.prompt,
            &ids,
            self.max_new,
            self.sampling,
            device,
        )
    }
}

/// Generates after `prompt`, whose token ids are `ids` (checked against the context),
/// from the export `file` loaded.
fn run_generate<B: TritterBackend>(
    file: &ModelFile,
    prompt: &str,
    ids: &[u32],
    max_new: usize,
    sampling: SamplingConfig,
    device: B::Device,
) -> Result<()> {
    let loaded = load_model_file::<B>(file, &device)?;
    let tokenizer = loaded.tokenizer.as_ref();
    let mut sampler = Sampler::new(sampling);
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(prompt.as_bytes())?;
    stdout.flush()?;
    let start = Instant::now();
    let mut printer = TextPrinter::default();
    let tokens = generate(
        &loaded.model,
        ids,
        max_new,
        &mut sampler,
        Some(tokenizer.eos()),
        true,
        |t| printer.push(t, tokenizer, &mut stdout),
    )?;
    let secs = start.elapsed().as_secs_f64();
    writeln!(stdout)?;
    eprintln!(
        "{} tokens in {secs:.2} s ({:.1} tokens/s)",
        tokens.len(),
        tokens.len() as f64 / secs.max(1e-9)
    );
    Ok(())
}

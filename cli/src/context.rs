//! The connection every command shares: a Kubernetes client from the user's kubeconfig
//! (`--kubeconfig`, `--context`) and the namespace to act in (`-n`, else the context's).

use anyhow::Context as _;
use kube::config::{KubeConfigOptions, Kubeconfig};

/// The global options: which cluster, as whom, in which namespace, printed how.
#[derive(Debug, Clone, clap::Args)]
pub struct Global {
    /// The namespace to act in (default: the kubeconfig context's namespace, else "default").
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// The kubeconfig context to use (default: the current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// The kubeconfig file (default: $KUBECONFIG, which may list several files, else
    /// ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// How to print results.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// `-o table|json|yaml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

/// A client and the namespace commands act in.
#[derive(Clone)]
pub struct Context {
    pub client: kube::Client,
    pub namespace: String,
    pub output: Output,
}

impl Context {
    /// Connects as the kubeconfig says.
    pub async fn connect(global: &Global) -> anyhow::Result<Self> {
        let options = KubeConfigOptions {
            context: global.context.clone(),
            ..KubeConfigOptions::default()
        };
        let config = match &global.kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .with_context(|| format!("read the kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &options).await
            }
            None => kube::Config::from_kubeconfig(&options).await,
        }
        .context("load the kubeconfig (set --kubeconfig or KUBECONFIG)")?;
        let namespace = global
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = kube::Client::try_from(config).context("build a Kubernetes client")?;
        Ok(Self {
            client,
            namespace,
            output: global.output,
        })
    }
}

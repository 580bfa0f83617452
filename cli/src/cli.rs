//! The command line: the global options and one subcommand per verb, each with examples
//! in its `--help`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};

use crate::context::{Context, Global};
use crate::{agents, console, grants, parse, sessions};

/// Agents, webhook URLs, Sessions and Grants of hookrun, as your kubeconfig identity.
#[derive(Debug, Parser)]
#[command(
    name = "kubectl-hookrun",
    bin_name = "kubectl hookrun",
    version,
    after_help = "Examples:
  kubectl hookrun agents                      # Agents of the current namespace
  kubectl hookrun invoke echo 'hello' --wait  # start a Session and print its answer
  kubectl hookrun logs echo-wh-cli-1a2b3c4d -f
  kubectl hookrun console                     # the local web console

Every command acts as your kubeconfig identity (--kubeconfig, --context, -n): what RBAC
allows you, nothing more. `kubectl hookrun <command> --help` shows each command's examples."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List Agents: Ready and its reason, trigger kinds, next scheduled run, Sessions running.
    #[command(after_help = "Examples:
  kubectl hookrun agents
  kubectl hookrun agents -A                   # every namespace you may list
  kubectl hookrun agents --show-url           # with webhook URLs (token masked)
  kubectl hookrun agents -o json | jq '.[] | select(.ready != \"True\")'

RBAC: list agents.hookrun.dev and list sessions.hookrun.dev (for the running count).")]
    Agents(AgentsArgs),

    /// Print an Agent's webhook URL, its token masked unless --show-token.
    #[command(after_help = "Examples:
  kubectl hookrun url echo
  URL=$(kubectl hookrun url echo --show-token)
  curl -sS -d '{\"title\":\"hello\",\"wait\":60}' \"$URL\"

RBAC: get agents.hookrun.dev; --show-token (or a cluster that redacts URLs in status)
also needs get secrets (the Agent's <agent>-webhook Secret).")]
    Url(UrlArgs),

    /// Rotate an Agent's webhook token and print the new URL once the operator wrote it.
    #[command(after_help = "Examples:
  kubectl hookrun rotate echo                 # the old token stays valid for the Agent's grace (default 10m)
  kubectl hookrun rotate echo --grace 1h      # the old token stays valid one more hour
  kubectl hookrun rotate echo --grace 0       # the old token stops working at once
  kubectl hookrun rotate echo --show-token

It sets the annotations hookrun.dev/rotate-token (a fresh value) and, with --grace,
hookrun.dev/rotation-grace on the Agent; the operator mints the new token.
RBAC: patch agents.hookrun.dev (and get secrets for --show-token).")]
    Rotate(RotateArgs),

    /// Start a Session of an Agent through the Kubernetes API (not the public URL).
    #[command(after_help = "Examples:
  kubectl hookrun invoke echo 'summarise the open incidents'
  kubectl hookrun invoke echo 'hello' --wait            # wait up to 5m for the answer
  kubectl hookrun invoke echo 'hello' --wait=30s -o json
  kubectl hookrun invoke triage 'look at #812' --env TICKET=812 --follow
  git diff | kubectl hookrun invoke review -           # the title from stdin

Exit codes with --wait or --follow: 0 the Session completed, 1 it ended in Error (or the
command failed), 2 the wait ran out first (the Session runs on).
RBAC: get agents.hookrun.dev, create sessions.hookrun.dev; --wait/--follow also list and
watch sessions.hookrun.dev.")]
    Invoke(InvokeArgs),

    /// List Sessions, newest last, optionally of one Agent.
    #[command(after_help = "Examples:
  kubectl hookrun sessions
  kubectl hookrun sessions echo
  kubectl hookrun sessions -o yaml

RBAC: list sessions.hookrun.dev.")]
    Sessions(SessionsArgs),

    /// Print a Session's events (or with --pod, its pod's container log).
    #[command(after_help = "Examples:
  kubectl hookrun logs echo-wh-cli-1a2b3c4d
  kubectl hookrun logs echo-wh-cli-1a2b3c4d -f          # follow until the Session ends
  kubectl hookrun logs echo-wh-cli-1a2b3c4d --pod       # the harness's own log

RBAC: get sessions.hookrun.dev (-f: list and watch); --pod: get pods/log (and get pods).")]
    Logs(LogsArgs),

    /// Put a message into a live Session (one that is pending or running).
    #[command(after_help = "Examples:
  kubectl hookrun send echo-k-3f2a9c1d0e4b-0 'also check the staging logs'

It mints a Grant for this one message (label \"kubectl hookrun send\", 60 s), posts the
message to the Grant's URL and deletes the Grant: users hold no right to write Session
status, and need none. RBAC: get sessions.hookrun.dev, create and delete
grants.hookrun.dev, get secrets (the Grant's token Secret).")]
    Send(SendArgs),

    /// Create a Grant for a live Session and print its URL (anyone holding it may send input).
    #[command(after_help = "Examples:
  kubectl hookrun expose echo-k-3f2a9c1d0e4b-0 --ttl 2h --label 'ci: release pipeline'
  URL=$(kubectl hookrun expose echo-k-3f2a9c1d0e4b-0)
  curl -sS -d '{\"message\":\"deploy is green\"}' \"$URL\"

RBAC: create grants.hookrun.dev, get secrets (the Grant's token Secret).")]
    Expose(ExposeArgs),

    /// List Grants: the Session each speaks into, label, expiry, revoked.
    #[command(after_help = "Examples:
  kubectl hookrun grants
  kubectl hookrun grants -o json

RBAC: list grants.hookrun.dev. URLs are never listed: `expose` prints one when made.")]
    Grants,

    /// Revoke a Grant at once (spec.revoked: true); it stays listed until it expires.
    #[command(after_help = "Examples:
  kubectl hookrun revoke echo-k-3f2a9c1d0e4b-0-1a2b3c

RBAC: patch grants.hookrun.dev.")]
    Revoke(RevokeArgs),

    /// Print a shell completion script.
    #[command(after_help = "Examples:
  source <(kubectl-hookrun completion bash)
  kubectl-hookrun completion zsh > \"${fpath[1]}/_kubectl-hookrun\"
  kubectl-hookrun completion fish > ~/.config/fish/completions/kubectl-hookrun.fish

The scripts complete the kubectl-hookrun binary (subcommands, flags, values);
`kubectl hookrun <TAB>` is not completed (see the README).")]
    Completion(CompletionArgs),

    /// Serve a local web console (loopback only) for watching and starting Sessions.
    #[command(after_help = "Examples:
  kubectl hookrun console
  kubectl hookrun console --port 8400 -n team-a")]
    Console(console::Args),
}

#[derive(Debug, clap::Args)]
pub struct AgentsArgs {
    /// Agents of every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Add each Agent's webhook URL, its token masked.
    #[arg(long)]
    pub show_url: bool,
}

#[derive(Debug, clap::Args)]
pub struct UrlArgs {
    /// The Agent.
    pub agent: String,
    /// Print the token instead of masking it (read from the Agent's Secret).
    #[arg(long)]
    pub show_token: bool,
}

#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    /// The Agent.
    pub agent: String,
    /// How long the previous token stays valid (`0`: stops at once; default: the Agent's
    /// hookrun.dev/rotation-grace annotation, else 10m).
    #[arg(long, value_parser = parse::duration)]
    pub grace: Option<Duration>,
    /// Print the new URL with its token.
    #[arg(long)]
    pub show_token: bool,
    /// How long to wait for the operator to write the new URL.
    #[arg(long, default_value = "60s", value_parser = parse::positive_duration)]
    pub timeout: Duration,
}

#[derive(Debug, clap::Args)]
pub struct InvokeArgs {
    /// The Agent.
    pub agent: String,
    /// The initial prompt (`-`: read it from stdin; default: "kubectl hookrun invoke — <agent>").
    pub title: Option<String>,
    /// A per-session environment variable, NAME=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_name = "NAME=VALUE", value_parser = parse::env_pair)]
    pub env: Vec<(String, String)>,
    /// Wait for the Session to end and print its answer; at most DURATION (default 5m).
    #[arg(
        long,
        value_name = "DURATION",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "5m",
        value_parser = parse::positive_duration
    )]
    pub wait: Option<Duration>,
    /// Print the Session's events live until it ends (with --wait: at most that long).
    #[arg(long, short = 'f')]
    pub follow: bool,
}

#[derive(Debug, clap::Args)]
pub struct SessionsArgs {
    /// Only Sessions of this Agent.
    pub agent: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The Session.
    pub session: String,
    /// Keep printing new events (or log lines) until the Session ends.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Print the session pod's container log (pods/log) instead of the Session's events.
    #[arg(long)]
    pub pod: bool,
}

#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// The live Session.
    pub session: String,
    /// The message (`-`: read it from stdin).
    pub message: String,
}

#[derive(Debug, clap::Args)]
pub struct ExposeArgs {
    /// The live Session.
    pub session: String,
    /// How long the URL works (default: the operator's --grant-default-ttl, 1h; at most its
    /// --grant-max-ttl).
    #[arg(long, value_parser = parse::positive_duration)]
    pub ttl: Option<Duration>,
    /// Who or what will hold the URL, shown by `grants` (e.g. "ci: release pipeline").
    #[arg(long)]
    pub label: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    /// The Grant.
    pub grant: String,
}

#[derive(Debug, clap::Args)]
pub struct CompletionArgs {
    /// The shell.
    pub shell: clap_complete::Shell,
}

/// Runs a command; the exit code says how it ended.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Completion(args) = &cli.command {
        let mut command = Cli::command();
        clap_complete::generate(
            args.shell,
            &mut command,
            "kubectl-hookrun",
            &mut std::io::stdout(),
        );
        return Ok(ExitCode::SUCCESS);
    }
    let context = Context::connect(&cli.global).await?;
    match cli.command {
        Command::Agents(args) => agents::list(&context, &args).await,
        Command::Url(args) => agents::url(&context, &args).await,
        Command::Rotate(args) => agents::rotate(&context, &args).await,
        Command::Invoke(args) => sessions::invoke(&context, args).await,
        Command::Sessions(args) => sessions::list(&context, &args).await,
        Command::Logs(args) => sessions::logs(&context, &args).await,
        Command::Send(args) => sessions::send(&context, args).await,
        Command::Expose(args) => grants::expose(&context, &args).await,
        Command::Grants => grants::list(&context).await,
        Command::Revoke(args) => grants::revoke(&context, &args).await,
        Command::Console(args) => console::run(context, args).await,
        Command::Completion(_) => Ok(ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn wait_takes_an_optional_duration() {
        let parse = |args: &[&str]| {
            let mut all = vec!["kubectl-hookrun", "invoke", "echo", "hi"];
            all.extend_from_slice(args);
            match Cli::try_parse_from(all).map(|c| c.command) {
                Ok(Command::Invoke(a)) => Ok(a.wait),
                Ok(other) => panic!("{other:?}"),
                Err(e) => Err(e.to_string()),
            }
        };
        assert_eq!(parse(&[]), Ok(None));
        assert_eq!(parse(&["--wait"]), Ok(Some(Duration::from_secs(300))));
        assert_eq!(parse(&["--wait=30s"]), Ok(Some(Duration::from_secs(30))));
        assert!(
            parse(&["--wait=never"])
                .expect_err("refused")
                .contains("1h30m")
        );
    }

    #[test]
    fn the_krew_manifest_template_fills_in_to_a_plugin_manifest() {
        let mut text = include_str!("../krew/hookrun.yaml").to_owned();
        for placeholder in [
            "VERSION",
            "BASE_URL",
            "SHA256_LINUX_AMD64",
            "SHA256_LINUX_ARM64",
            "SHA256_DARWIN_AMD64",
            "SHA256_DARWIN_ARM64",
        ] {
            text = text.replace(&format!("${{{placeholder}}}"), "x");
        }
        assert!(!text.contains("${"), "a placeholder is left: {text}");
        let manifest: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
        assert_eq!(manifest["kind"], "Plugin");
        assert_eq!(manifest["metadata"]["name"], "hookrun");
        let platforms = manifest["spec"]["platforms"]
            .as_sequence()
            .expect("platforms");
        assert!(platforms.iter().all(|p| p["bin"] == "kubectl-hookrun"));
    }

    #[test]
    fn every_command_shows_examples() {
        let command = Cli::command();
        for sub in command.get_subcommands() {
            if sub.get_name() == "help" {
                continue;
            }
            let help = sub
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            assert!(
                help.contains("Examples:"),
                "{} has no examples",
                sub.get_name()
            );
        }
    }
}

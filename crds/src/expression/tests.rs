use std::time::{Duration, Instant};

use serde_json::json;

use super::*;

fn vars(body: Json, headers: &[(&str, &str)], provider: &str) -> Variables {
    Variables::new(
        &Reads::everything(),
        &body,
        headers.iter().copied(),
        provider,
        "team-a",
        "triage-bot",
    )
}

fn expr(source: &str) -> Expression {
    compile("spec.triggers[0].webhook.filter", source).expect("compiles")
}

#[test]
fn every_variable_is_readable() {
    let v = vars(
        json!({"action": "created", "n": 3, "list": [1, 2]}),
        &[("X-GitHub-Event", "issue_comment")],
        "github",
    );
    assert_eq!(
        expr("body.action == 'created' && body.n == 3 && size(body.list) == 2").evaluate_bool(&v),
        Ok(true)
    );
    assert_eq!(
        expr("headers['x-github-event'] == 'issue_comment'").evaluate_bool(&v),
        Ok(true)
    );
    assert_eq!(expr("provider == 'github'").evaluate_bool(&v), Ok(true));
    assert_eq!(
        expr("agent.name == 'triage-bot' && agent.namespace == 'team-a'").evaluate_bool(&v),
        Ok(true)
    );
    assert_eq!(
        expr("agent.name + '/' + string(body.n)")
            .evaluate_text(&v)
            .as_deref(),
        Ok("triage-bot/3")
    );
    assert_eq!(expr("body.n").evaluate_text(&v).as_deref(), Ok("3"));
}

#[test]
fn compile_errors_name_the_field_and_the_position() {
    let err = compile("spec.triggers[0].webhook.title", "body.issue.title +").expect_err("invalid");
    assert_eq!(err.field, "spec.triggers[0].webhook.title");
    assert!(err.message.contains("is not valid CEL"), "{err}");
    assert!(err.message.contains("line 1, column"), "{err}");
    let err = compile("f", "a &&\n  (b ||").expect_err("invalid");
    assert!(err.message.contains("line 2"), "{err}");
    let err = compile("f", "   ").expect_err("empty");
    assert!(err.message.contains("must not be empty"), "{err}");
    let long = format!("'{}' == ''", "x".repeat(MAX_EXPRESSION_BYTES));
    let err = compile("f", &long).expect_err("too long");
    assert!(err.message.contains("at most 4096"), "{err}");
}

#[test]
fn runtime_errors_are_errors_not_values() {
    let v = vars(json!({"action": "opened"}), &[], "none");
    let missing = expr("body.comment.body.contains('x')")
        .evaluate_bool(&v)
        .expect_err("missing field");
    assert!(missing.contains("comment"), "{missing}");
    let wrong_type = expr("body.action > 3")
        .evaluate_bool(&v)
        .expect_err("wrong type");
    assert!(!wrong_type.is_empty());
    let not_bool = expr("body.action").evaluate_bool(&v).expect_err("a string");
    assert!(not_bool.contains("not a bool"), "{not_bool}");
    let not_text = expr("body").evaluate_text(&v).expect_err("a map");
    assert!(not_text.contains("not a string"), "{not_text}");
}

#[test]
fn the_shape_is_bounded_at_compile_time() {
    let err = compile("f", "body.a.exists(x, body.b.exists(y, x == y))").expect_err("nested");
    assert!(err.message.contains("nests a comprehension"), "{err}");
    let err = compile("f", "[[1]].map(x, x.map(y, y))").expect_err("nested in the step");
    assert!(err.message.contains("nests"), "{err}");
    // Side by side and over a comprehension's result is fine.
    compile("f", "body.a.map(x, x).filter(y, y > 0).size() > 0").expect("siblings compile");
    let many = ["body.a.exists(x, x == 1)"; MAX_COMPREHENSIONS + 1].join(" || ");
    assert!(
        compile("f", &many)
            .expect_err("too many")
            .message
            .contains("comprehensions")
    );
    let adds = ["body.s"; MAX_ADDITIONS + 2].join(" + ");
    assert!(
        compile("f", &adds)
            .expect_err("too many")
            .message
            .contains("+ operators")
    );
}

#[test]
fn bodies_with_too_many_values_are_an_error() {
    let body = Json::Array(vec![json!(0); MAX_BODY_VALUES]);
    let err = expr("true")
        .evaluate_bool(&vars(body, &[], "none"))
        .expect_err("too large");
    assert!(err.contains("JSON values"), "{err}");
    let body = Json::Array(vec![json!(0); MAX_BODY_VALUES - 1]);
    assert_eq!(
        expr("size(body) > 0").evaluate_bool(&vars(body, &[], "none")),
        Ok(true)
    );
}

#[test]
fn form_fields_are_decoded() {
    let form = form_fields(b"command=%2Fdeploy&text=api+now&text=web").expect("a form");
    assert_eq!(form, json!({"command": "/deploy", "text": "web"}));
    assert_eq!(form_fields(b"a=%zz"), None);
}

#[test]
fn trigger_env_names_follow_the_env_rules() {
    let webhook: WebhookTrigger = serde_json::from_value(json!({
        "filter": "true",
        "env": [{"name": "REPO", "expression": "body.repo"}, {"name": "HOOKRUN_X", "expression": "'x'"}],
    }))
    .expect("a trigger");
    let err = compile_trigger("spec.triggers[0].webhook", &webhook, &[]).expect_err("reserved");
    assert_eq!(err.field, "spec.triggers[0].webhook.env[1].name");
    let webhook: WebhookTrigger = serde_json::from_value(json!({
        "env": [{"name": "REPO", "expression": "body.repo"}],
    }))
    .expect("a trigger");
    let err = compile_trigger("w", &webhook, &["REPO".to_owned()]).expect_err("the Agent's own");
    assert!(err.message.contains("spec.session.env"), "{err}");
    let compiled = compile_trigger("w", &webhook, &[]).expect("valid");
    assert_eq!(compiled.env[0].0, "REPO");
    assert_eq!(compiled.filter_error_policy, FilterErrorPolicy::Reject);
}

/// A GitHub `issue_comment` delivery (shape from GitHub's webhook documentation).
pub(crate) fn github_issue_comment(comment: &str) -> Json {
    json!({
        "action": "created",
        "issue": {"number": 42, "title": "Crash on start", "state": "open",
                  "user": {"login": "octocat"}, "labels": [{"name": "bug"}]},
        "comment": {"id": 1, "body": comment, "user": {"login": "octocat"}},
        "repository": {"name": "hello", "full_name": "octo/hello", "private": false},
        "sender": {"login": "octocat", "type": "User"}
    })
}

pub(crate) const GITHUB_FILTER: &str = "headers['x-github-event'] == 'issue_comment' && \
    body.action == 'created' && body.comment.body.contains('@' + agent.name)";
pub(crate) const GITHUB_TITLE: &str =
    "body.repository.full_name + '#' + string(body.issue.number) + ': ' + body.issue.title";

#[test]
fn provider_examples() {
    let github = |comment: &str, event: &str| {
        vars(
            github_issue_comment(comment),
            &[("x-github-event", event)],
            "github",
        )
    };
    let mention = github("@triage-bot please look", "issue_comment");
    assert_eq!(expr(GITHUB_FILTER).evaluate_bool(&mention), Ok(true));
    assert_eq!(
        expr(GITHUB_FILTER).evaluate_bool(&github("thanks", "issue_comment")),
        Ok(false)
    );
    assert_eq!(
        expr(GITHUB_FILTER).evaluate_bool(&github("@triage-bot", "issues")),
        Ok(false)
    );
    assert_eq!(
        expr(GITHUB_TITLE).evaluate_text(&mention).as_deref(),
        Ok("octo/hello#42: Crash on start")
    );

    // Linear: only Project create.
    let linear = |kind: &str, action: &str| {
        vars(
            json!({"action": action, "type": kind, "data": {"id": "p1", "name": "Q3 launch"},
                    "url": "https://linear.app/x/project/q3", "webhookTimestamp": 1}),
            &[],
            "linear",
        )
    };
    let filter = expr("body.type == 'Project' && body.action == 'create'");
    assert_eq!(filter.evaluate_bool(&linear("Project", "create")), Ok(true));
    assert_eq!(
        filter.evaluate_bool(&linear("Project", "update")),
        Ok(false)
    );
    assert_eq!(filter.evaluate_bool(&linear("Issue", "create")), Ok(false));
    assert_eq!(
        expr("'New Linear project: ' + body.data.name")
            .evaluate_text(&linear("Project", "create"))
            .as_deref(),
        Ok("New Linear project: Q3 launch")
    );

    // Slack: only app_mention.
    let slack = |kind: &str| {
        vars(
            json!({"type": "event_callback", "team_id": "T1",
                    "event": {"type": kind, "user": "U1", "text": "<@U0BOT> summarize", "channel": "C1"}}),
            &[],
            "slack",
        )
    };
    let filter = expr("body.type == 'event_callback' && body.event.type == 'app_mention'");
    assert_eq!(filter.evaluate_bool(&slack("app_mention")), Ok(true));
    assert_eq!(filter.evaluate_bool(&slack("message")), Ok(false));

    // Generic: a field the sender chooses, with has() for optional fields.
    let generic = expr("has(body.severity) && body.severity in ['high', 'critical']");
    assert_eq!(
        generic.evaluate_bool(&vars(json!({"severity": "high"}), &[], "none")),
        Ok(true)
    );
    assert_eq!(
        generic.evaluate_bool(&vars(json!({"title": "x"}), &[], "none")),
        Ok(false)
    );
}

/// The worst cases constructed within the compile-time and body limits: every allowed
/// comprehension over a body of the most values, the concatenation chain, and scans of
/// one long string. Prints the time of each (see docs/security.md for the figures).
#[test]
fn worst_cases_stay_bounded() {
    let list = Json::Array(vec![json!("ab"); MAX_BODY_VALUES - 2]);
    let big = vars(json!({"l": list}), &[], "none");
    let comprehensions = ["body.l.exists(x, x == 'zz')"; MAX_COMPREHENSIONS].join(" || ");
    let mapped = ["body.l.map(x, x + x).size()"; MAX_COMPREHENSIONS].join(" + ");
    let concat = format!("size({}) > 0", ["body.l"; MAX_ADDITIONS + 1].join(" + "));
    let long = vars(json!({"s": "a".repeat(200 * 1024)}), &[], "none");
    let scans = ["body.s.contains('b')"; 100].join(" || ");
    let mut worst = Duration::ZERO;
    for (name, source, v) in [
        ("comprehensions", comprehensions.as_str(), &big),
        ("mapped", mapped.as_str(), &big),
        ("concatenation", concat.as_str(), &big),
        ("scans", scans.as_str(), &long),
    ] {
        let e = compile("f", source).expect("within the limits");
        let started = Instant::now();
        let _ = e.run(v);
        let took = started.elapsed();
        eprintln!("worst case {name}: {took:?}");
        worst = worst.max(took);
    }
    // Generous for unoptimised test builds; the bench measures release builds.
    assert!(worst < Duration::from_secs(2), "{worst:?}");
}

/// The GitHub example's expressions compile and filter to comments mentioning it.
#[test]
fn the_github_example_filters_to_mentions() {
    let text = include_str!("../../../examples/github-agent.yaml");
    let agent: crate::Agent = text
        .split("\n---\n")
        .filter_map(|doc| serde_yaml::from_str::<serde_yaml::Value>(doc).ok())
        .find(|doc| doc["kind"] == "Agent")
        .and_then(|doc| serde_yaml::from_value(doc).ok())
        .expect("an Agent in the example");
    let webhook = agent.spec.webhook().expect("a webhook trigger");
    let compiled = compile_trigger("spec.triggers[0].webhook", webhook, &[]).expect("compiles");
    let filter = compiled.filter.expect("a filter");
    let run = |comment: &str| {
        let v = Variables::new(
            &compiled.reads,
            &github_issue_comment(comment),
            [("x-github-event", "issue_comment")],
            "github",
            "team-a",
            "github-reviewer",
        );
        filter.evaluate_bool(&v)
    };
    assert_eq!(run("@github-reviewer please review"), Ok(true));
    assert_eq!(run("looks good"), Ok(false));
    assert_eq!(compiled.env.len(), 2);
}

#[test]
fn reads_are_the_field_chains_and_anything_else_reads_whole() {
    let reads = |source: &str| expr(source).reads().clone();
    let fields = |pairs: &[(&str, Need)]| {
        Need::Fields(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        )
    };
    let r = reads("body.issue.title + body['issue'].user.login + headers['x-github-event']");
    assert_eq!(
        r.body,
        fields(&[(
            "issue",
            fields(&[
                ("title", Need::Whole),
                ("user", fields(&[("login", Need::Whole)]))
            ])
        )])
    );
    assert_eq!(r.headers, fields(&[("x-github-event", Need::Whole)]));
    assert_eq!(reads("provider == 'github'"), Reads::default());
    assert_eq!(
        reads("size(body.labels) > 0 && has(body.issue.x)").body,
        fields(&[
            ("labels", Need::Whole),
            ("issue", fields(&[("x", Need::Whole)]))
        ])
    );
    // A whole read absorbs the field reads below it.
    assert_eq!(
        reads("body.issue.title == '' || body.issue == {}").body,
        fields(&[("issue", Need::Whole)])
    );
    assert_eq!(
        reads("body.items[0].name == 'x'").body,
        fields(&[("items", Need::Whole)])
    );
    assert_eq!(reads("body == null").body, Need::Whole);
    assert_eq!(reads("'a' in headers").headers, Need::Whole);
}

#[test]
fn converting_only_what_is_read_changes_no_result() {
    let body = json!({
        "action": "created", "n": 3, "list": [1, {"a": 2}], "empty": {},
        "issue": {"title": "T", "number": 42, "labels": [{"name": "bug"}], "user": {"login": "o"}},
        "deep": {"a": {"b": {"c": "d"}}},
    });
    let headers = [("X-GitHub-Event", "issue_comment"), ("X-Other", "1")];
    for source in [
        "body.action == 'created' && body.n == 3",
        "body.issue.title + '#' + string(body.issue.number)",
        "has(body.issue.missing) || has(body.deep.a.b)",
        "body.issue.missing == 1",
        "body.issue.labels.exists(l, l.name == 'bug')",
        "body.list[1].a == 2",
        "body.deep.a == {'b': {'c': 'd'}}",
        "size(body.issue) == 4 && size(body.empty) == 0",
        "headers['x-github-event'] == 'issue_comment' && !('x-missing' in headers)",
        "size(headers) == 2",
        "body.deep['a'].b.c + body.deep.a.b.c",
        "body.action.nope",
        "body == body",
        ".body.action == 'created' && .headers['x-other'] == '1'",
    ] {
        let e = expr(source);
        let all = Variables::new(&Reads::everything(), &body, headers, "github", "ns", "a");
        let read = Variables::new(e.reads(), &body, headers, "github", "ns", "a");
        assert_eq!(e.evaluate_bool(&read), e.evaluate_bool(&all), "{source}");
        assert_eq!(e.evaluate_text(&read), e.evaluate_text(&all), "{source}");
    }
}

#[test]
fn the_value_budget_counts_only_what_is_read() {
    let none: [(&str, &str); 0] = [];
    let big = json!({"l": vec![1; MAX_BODY_VALUES], "ok": true});
    let e = expr("body.ok");
    let read = Variables::new(e.reads(), &big, none, "none", "ns", "a");
    assert_eq!(e.evaluate_bool(&read), Ok(true));
    let e = expr("body.ok && size(body.l) > 0");
    let read = Variables::new(e.reads(), &big, none, "none", "ns", "a");
    let err = e.evaluate_bool(&read).expect_err("over the budget");
    assert!(err.contains("JSON values"), "{err}");
}

#[test]
fn the_session_key_is_compiled_with_the_trigger_and_names_a_github_issue() {
    let webhook: WebhookTrigger = serde_json::from_value(json!({
        "sessionKey": "'github/' + body.repository.full_name + '#' + string(body.issue.number)",
    }))
    .expect("a trigger");
    let compiled = compile_trigger("spec.triggers[0].webhook", &webhook, &[]).expect("compiles");
    assert!(!compiled.is_empty());
    let key = compiled.session_key.as_ref().expect("a sessionKey");
    let variables = vars(github_issue_comment("@triage-bot again"), &[], "github");
    assert_eq!(
        key.evaluate_text(&variables),
        Ok("github/octo/hello#42".to_owned())
    );
    let bad: WebhookTrigger =
        serde_json::from_value(json!({"sessionKey": "body.("})).expect("a trigger");
    let err = compile_trigger("spec.triggers[0].webhook", &bad, &[]).expect_err("not CEL");
    assert_eq!(err.field, "spec.triggers[0].webhook.sessionKey");
}

/// The live examples' expressions compile; the GitHub issue agent keys its Sessions by
/// issue, takes new comments by people, and titles comments with their author.
#[test]
fn the_live_examples_key_their_sessions() {
    let agent_of = |text: &str| -> crate::Agent {
        text.split("\n---\n")
            .filter_map(|doc| serde_yaml::from_str::<serde_yaml::Value>(doc).ok())
            .find(|doc| doc["kind"] == "Agent")
            .and_then(|doc| serde_yaml::from_value(doc).ok())
            .expect("an Agent in the example")
    };
    let issues = agent_of(include_str!("../../../examples/github-issue-agent.yaml"));
    assert_eq!(issues.spec.idle_timeout_seconds(), 1800);
    let webhook = issues.spec.webhook().expect("a webhook trigger");
    let compiled = compile_trigger("spec.triggers[0].webhook", webhook, &[]).expect("compiles");
    let v = Variables::new(
        &compiled.reads,
        &github_issue_comment("what about Windows?"),
        [("x-github-event", "issue_comment")],
        "github",
        "team-a",
        "github-issue-agent",
    );
    let key = compiled.session_key.as_ref().expect("a sessionKey");
    assert_eq!(key.evaluate_text(&v), Ok("github/octo/hello#42".to_owned()));
    assert_eq!(
        compiled.filter.as_ref().map(|f| f.evaluate_bool(&v)),
        Some(Ok(true))
    );
    let title = compiled.title.as_ref().expect("a title");
    assert_eq!(
        title.evaluate_text(&v),
        Ok("octocat: what about Windows?".to_owned())
    );

    let echo = agent_of(include_str!("../../../examples/echo-agent.yaml"));
    let webhook = echo.spec.webhook().expect("a webhook trigger");
    let compiled = compile_trigger("spec.triggers[0].webhook", webhook, &[]).expect("compiles");
    let key = compiled.session_key.as_ref().expect("a sessionKey");
    let none: [(&str, &str); 0] = [];
    let with = Variables::new(
        &compiled.reads,
        &json!({"title": "hi", "thread": "t1"}),
        none,
        "none",
        "d",
        "echo",
    );
    assert_eq!(key.evaluate_text(&with), Ok("thread/t1".to_owned()));
    let without = Variables::new(
        &compiled.reads,
        &json!({"title": "hi"}),
        none,
        "none",
        "d",
        "echo",
    );
    assert!(key.evaluate_text(&without).is_err(), "no thread: no key");
}

//! The CEL expressions of the webhook trigger (`filter`, `title`, `env[].expression`):
//! compiling them with the limits that bound their cost, and evaluating them against a
//! request. Pure: the operator compiles to report a bad expression in the Agent's status,
//! the apiserver compiles once per Agent generation and evaluates per request, and both
//! use these same functions, so they agree on what is valid.
//!
//! The bound: an expression is at most [`MAX_EXPRESSION_BYTES`] long, its comprehension
//! macros (`all`, `exists`, `exists_one`, `map`, `filter`) do not nest and there are at
//! most [`MAX_COMPREHENSIONS`] of them, and it has at most [`MAX_ADDITIONS`] `+`
//! operators (a chain of list or string concatenations is the other way to make work
//! grow with the payload). Only the parts of the body and headers that expressions read
//! are converted to CEL values ([`Reads`]), at most [`MAX_BODY_VALUES`] JSON values of
//! them; reading more is an evaluation error.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use cel::common::ast::{Expr, IdedExpr, LiteralValue, operators};
use cel::objects::Key;
use cel::{Context, Env, Program, Value};
use serde_json::Value as Json;

use crate::agent::{FilterErrorPolicy, WebhookTrigger};
use crate::validation::{FieldError, check_env_name};

/// The longest expression accepted, in bytes.
pub const MAX_EXPRESSION_BYTES: usize = 4096;
/// How many comprehension macros one expression may hold; they may not nest.
pub const MAX_COMPREHENSIONS: usize = 2;
/// How many `+` operators one expression may hold.
pub const MAX_ADDITIONS: usize = 8;
/// The most JSON values (objects, arrays and scalars together) that expressions may read
/// of one body.
pub const MAX_BODY_VALUES: usize = 1024;
/// How many `env` mappings one trigger may carry.
pub const MAX_ENV_EXPRESSIONS: usize = 64;

/// The one CEL environment: the standard library, nothing more.
static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

/// A compiled expression and its source.
#[derive(Clone)]
pub struct Expression {
    source: Arc<str>,
    program: Arc<Program>,
    reads: Reads,
}

impl std::fmt::Debug for Expression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Expression").field(&self.source).finish()
    }
}

/// Two expressions are the same when their sources are: compiling is deterministic.
impl PartialEq for Expression {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Expression {}

/// Compiles `source`, the value of `field`: the error names the field and, for a syntax
/// error, the parser's message with its line and column.
pub fn compile(field: &str, source: &str) -> Result<Expression, FieldError> {
    let error = |message: String| FieldError {
        field: field.to_owned(),
        message,
    };
    if source.trim().is_empty() {
        return Err(error(
            "must not be empty: write a CEL expression".to_owned(),
        ));
    }
    if source.len() > MAX_EXPRESSION_BYTES {
        return Err(error(format!(
            "is {} bytes long: write at most {MAX_EXPRESSION_BYTES}",
            source.len()
        )));
    }
    let program = ENV.compile(source).map_err(|errors| {
        let message = errors
            .errors
            .first()
            .map(|e| {
                // The parser quotes the offending input, which can be the whole
                // expression: its message is cut like an evaluation error's.
                format!(
                    "is not valid CEL: {} at line {}, column {}",
                    short(e.msg.clone()),
                    e.pos.0,
                    e.pos.1
                )
            })
            .unwrap_or_else(|| "is not valid CEL".to_owned());
        error(message)
    })?;
    let mut shape = Shape::default();
    shape.visit(program.expression(), 0);
    if shape.deepest > 1 {
        return Err(error(
            "nests a comprehension (all, exists, exists_one, map, filter) inside another: \
             at most one level is allowed, so evaluation stays bounded"
                .to_owned(),
        ));
    }
    if shape.comprehensions > MAX_COMPREHENSIONS {
        return Err(error(format!(
            "has {} comprehensions (all, exists, exists_one, map, filter): use at most \
             {MAX_COMPREHENSIONS}",
            shape.comprehensions
        )));
    }
    if shape.additions > MAX_ADDITIONS {
        return Err(error(format!(
            "has {} + operators: use at most {MAX_ADDITIONS}",
            shape.additions
        )));
    }
    let mut reads = Reads::default();
    reads.visit(program.expression());
    Ok(Expression {
        source: source.into(),
        program: Arc::new(program),
        reads,
    })
}

/// What of one variable (`body` or `headers`) expressions read: all of it, or some of
/// its fields, each read in turn whole or in part.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Need {
    /// Nothing: the variable is bound to an empty map.
    #[default]
    Nothing,
    /// These fields only (a field missing from the value stays missing).
    Fields(std::collections::BTreeMap<String, Need>),
    /// The whole value.
    Whole,
}

impl Need {
    fn add(&mut self, path: &[String]) {
        let Some((first, rest)) = path.split_first() else {
            *self = Need::Whole;
            return;
        };
        match self {
            Need::Whole => {}
            Need::Nothing => {
                *self = Need::Fields(Default::default());
                self.add(path);
            }
            Need::Fields(fields) => fields.entry(first.clone()).or_default().add(rest),
        }
    }

    fn merge(&mut self, other: &Need) {
        match (&mut *self, other) {
            (Need::Whole, _) | (_, Need::Nothing) => {}
            (_, Need::Whole) => *self = Need::Whole,
            (Need::Nothing, Need::Fields(_)) => *self = other.clone(),
            (Need::Fields(mine), Need::Fields(theirs)) => {
                for (name, need) in theirs {
                    mine.entry(name.clone()).or_default().merge(need);
                }
            }
        }
    }
}

/// What expressions read of the request, found in their syntax: only that is converted
/// to CEL values per request. A field chain from a variable (`body.issue.title`,
/// `headers['x-github-event']`, `has(body.a.b)`) reads the value at its end; a variable or
/// chain used any other way (compared whole, passed to `size`, iterated) reads all of it.
/// A map converted in part is only ever reached through field selections of fields it
/// holds, so evaluation cannot tell it from the whole one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reads {
    pub body: Need,
    pub headers: Need,
}

impl Reads {
    /// Everything: for callers that evaluate expressions they did not compile together.
    pub fn everything() -> Self {
        Self {
            body: Need::Whole,
            headers: Need::Whole,
        }
    }

    /// Adds what `other` reads.
    pub fn merge(&mut self, other: &Reads) {
        self.body.merge(&other.body);
        self.headers.merge(&other.headers);
    }

    fn visit(&mut self, expr: &IdedExpr) {
        if let Some((variable, path)) = chain(expr) {
            match variable {
                "body" => self.body.add(&path),
                "headers" => self.headers.add(&path),
                _ => {}
            }
            return;
        }
        match &expr.expr {
            Expr::Comprehension(c) => {
                for part in [
                    &c.iter_range,
                    &c.accu_init,
                    &c.loop_cond,
                    &c.loop_step,
                    &c.result,
                ] {
                    self.visit(part);
                }
            }
            Expr::Call(call) => {
                if let Some(target) = &call.target {
                    self.visit(target);
                }
                for arg in &call.args {
                    self.visit(arg);
                }
            }
            Expr::List(list) => list.elements.iter().for_each(|e| self.visit(e)),
            Expr::Map(map) => {
                for entry in &map.entries {
                    if let cel::common::ast::EntryExpr::MapEntry(e) = &entry.expr {
                        self.visit(&e.key);
                        self.visit(&e.value);
                    }
                }
            }
            Expr::Select(select) => self.visit(&select.operand),
            Expr::Struct(s) => {
                for entry in &s.entries {
                    if let cel::common::ast::EntryExpr::StructField(f) = &entry.expr {
                        self.visit(&f.value);
                    }
                }
            }
            Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
        }
    }
}

/// `expr` as a variable and a chain of field names (`body.a['b'].c` is `body`, `[a, b,
/// c]`), when it is one.
fn chain(expr: &IdedExpr) -> Option<(&str, Vec<String>)> {
    match &expr.expr {
        // `.body` names the same variable as `body` (a name from the root scope).
        Expr::Ident(name) => Some((name.strip_prefix('.').unwrap_or(name), Vec::new())),
        Expr::Select(select) => {
            let (variable, mut path) = chain(&select.operand)?;
            path.push(select.field.clone());
            Some((variable, path))
        }
        Expr::Call(call) if call.func_name == operators::INDEX && call.target.is_none() => {
            let [operand, index] = call.args.as_slice() else {
                return None;
            };
            let Expr::Literal(LiteralValue::String(field)) = &index.expr else {
                return None;
            };
            let (variable, mut path) = chain(operand)?;
            path.push(field.inner().to_owned());
            Some((variable, path))
        }
        _ => None,
    }
}

/// What of an expression's shape bounds its cost.
#[derive(Default)]
struct Shape {
    comprehensions: usize,
    additions: usize,
    deepest: usize,
}

impl Shape {
    fn visit(&mut self, expr: &IdedExpr, depth: usize) {
        match &expr.expr {
            Expr::Comprehension(c) => {
                self.comprehensions += 1;
                let inner = depth + 1;
                self.deepest = self.deepest.max(inner);
                self.visit(&c.iter_range, depth);
                self.visit(&c.accu_init, depth);
                for part in [&c.loop_cond, &c.loop_step, &c.result] {
                    self.visit(part, inner);
                }
            }
            Expr::Call(call) => {
                if call.func_name == "_+_" {
                    self.additions += 1;
                }
                if let Some(target) = &call.target {
                    self.visit(target, depth);
                }
                for arg in &call.args {
                    self.visit(arg, depth);
                }
            }
            Expr::List(list) => {
                for e in &list.elements {
                    self.visit(e, depth);
                }
            }
            Expr::Map(map) => {
                for entry in &map.entries {
                    if let cel::common::ast::EntryExpr::MapEntry(e) = &entry.expr {
                        self.visit(&e.key, depth);
                        self.visit(&e.value, depth);
                    }
                }
            }
            Expr::Select(select) => self.visit(&select.operand, depth),
            Expr::Struct(s) => {
                for entry in &s.entries {
                    if let cel::common::ast::EntryExpr::StructField(f) = &entry.expr {
                        self.visit(&f.value, depth);
                    }
                }
            }
            Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
        }
    }
}

/// Every expression of a webhook trigger, compiled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TriggerExpressions {
    pub filter: Option<Expression>,
    pub title: Option<Expression>,
    /// `(variable name, expression)` in the order the trigger lists them.
    pub env: Vec<(String, Expression)>,
    /// The `sessionKey`: which conversation a request belongs to.
    pub session_key: Option<Expression>,
    pub filter_error_policy: FilterErrorPolicy,
    /// What the expressions read together: what [`Variables::new`] converts.
    pub reads: Reads,
}

impl TriggerExpressions {
    /// Whether the trigger has any expression.
    pub fn is_empty(&self) -> bool {
        self.filter.is_none()
            && self.title.is_none()
            && self.env.is_empty()
            && self.session_key.is_none()
    }
}

/// Compiles every expression of `webhook` (the trigger at `path`, e.g.
/// `spec.triggers[0].webhook`) and checks the `env` names: valid, not reserved, each once
/// and none that `spec.session.env` (`agent_env`) sets. The first error is returned.
pub fn compile_trigger(
    path: &str,
    webhook: &WebhookTrigger,
    agent_env: &[String],
) -> Result<TriggerExpressions, FieldError> {
    let filter = webhook
        .filter
        .as_deref()
        .map(|s| compile(&format!("{path}.filter"), s))
        .transpose()?;
    let title = webhook
        .title
        .as_deref()
        .map(|s| compile(&format!("{path}.title"), s))
        .transpose()?;
    if webhook.env.len() > MAX_ENV_EXPRESSIONS {
        return Err(FieldError {
            field: format!("{path}.env"),
            message: format!(
                "has {} entries: use at most {MAX_ENV_EXPRESSIONS}",
                webhook.env.len()
            ),
        });
    }
    let mut env: Vec<(String, Expression)> = Vec::with_capacity(webhook.env.len());
    for (i, mapping) in webhook.env.iter().enumerate() {
        let name_field = format!("{path}.env[{i}].name");
        let name_error = |message: String| FieldError {
            field: name_field.clone(),
            message,
        };
        check_env_name(&mapping.name).map_err(name_error)?;
        if agent_env.contains(&mapping.name) {
            return Err(name_error(format!(
                "{:?} is set by spec.session.env: an expression cannot replace it",
                mapping.name
            )));
        }
        if env.iter().any(|(n, _)| *n == mapping.name) {
            return Err(name_error(format!(
                "{:?} is mapped twice: map each variable once",
                mapping.name
            )));
        }
        let expression = compile(&format!("{path}.env[{i}].expression"), &mapping.expression)?;
        env.push((mapping.name.clone(), expression));
    }
    let session_key = webhook
        .session_key
        .as_deref()
        .map(|s| compile(&format!("{path}.sessionKey"), s))
        .transpose()?;
    let mut reads = Reads::default();
    for expression in filter
        .iter()
        .chain(&title)
        .chain(&session_key)
        .chain(env.iter().map(|(_, e)| e))
    {
        reads.merge(&expression.reads);
    }
    Ok(TriggerExpressions {
        filter,
        title,
        env,
        session_key,
        filter_error_policy: webhook.filter_error_policy.unwrap_or_default(),
        reads,
    })
}

/// What an expression can read: `body`, `headers`, `provider` and `agent`, bound once
/// per request and shared by every expression evaluated on it.
pub struct Variables {
    /// The bound variables, or why `body` cannot be given to expressions (too many
    /// values).
    context: Result<Context<'static, 'static>, String>,
}

impl Variables {
    /// The variables of one request. `body` is the JSON payload, or the form fields of a
    /// form-encoded one (`Json::Null` when it is neither); `headers` are `(name, value)`
    /// pairs whose names are lower-cased and whose last value wins.
    pub fn new<'h>(
        reads: &Reads,
        body: &Json,
        headers: impl IntoIterator<Item = (&'h str, &'h str)>,
        provider: &str,
        namespace: &str,
        name: &str,
    ) -> Self {
        let mut budget = MAX_BODY_VALUES;
        let Some(body) = json_to_cel(body, &reads.body, &mut budget) else {
            return Self {
                context: Err(format!(
                    "the expressions read more than {MAX_BODY_VALUES} JSON values of the \
                     body: they are evaluated only when they read fewer"
                )),
            };
        };
        let headers: HashMap<Key, Value> = match &reads.headers {
            Need::Nothing => HashMap::new(),
            need => headers
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .filter(|(k, _)| match need {
                    Need::Fields(fields) => fields.contains_key(k),
                    _ => true,
                })
                .map(|(k, v)| (Key::from(k), Value::from(v)))
                .collect(),
        };
        let agent: HashMap<Key, Value> = [
            (Key::from("name".to_owned()), Value::from(name)),
            (Key::from("namespace".to_owned()), Value::from(namespace)),
        ]
        .into();
        let mut context = Context::with_env(ENV.clone());
        context.add_variable_from_value("body", body);
        context.add_variable_from_value("headers", Value::from(headers));
        context.add_variable_from_value("provider", Value::from(provider));
        context.add_variable_from_value("agent", Value::from(agent));
        Self {
            context: Ok(context),
        }
    }
}

/// The longest parser or evaluation error message kept (it goes into status, answers
/// and logs).
const MAX_ERROR_CHARS: usize = 256;

fn short(message: String) -> String {
    match message.char_indices().nth(MAX_ERROR_CHARS) {
        None => message,
        Some((cut, _)) => format!("{}…", &message[..cut]),
    }
}

impl Expression {
    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// What the expression reads of the request.
    pub fn reads(&self) -> &Reads {
        &self.reads
    }

    fn run(&self, variables: &Variables) -> Result<Value, String> {
        let context = variables.context.as_ref().map_err(Clone::clone)?;
        self.program
            .execute(context)
            .map_err(|e| short(e.to_string()))
    }

    /// Evaluates a filter: `Ok(bool)`, or the error (also for a non-bool result).
    pub fn evaluate_bool(&self, variables: &Variables) -> Result<bool, String> {
        match self.run(variables)? {
            Value::Bool(b) => Ok(b),
            other => Err(format!(
                "the filter returned a {}, not a bool",
                other.type_of()
            )),
        }
    }

    /// Evaluates a title or env expression: a string, or a number or bool as text;
    /// anything else is an error.
    pub fn evaluate_text(&self, variables: &Variables) -> Result<String, String> {
        match self.run(variables)? {
            Value::String(s) => Ok(s.as_str().to_owned()),
            Value::Int(i) => Ok(i.to_string()),
            Value::UInt(u) => Ok(u.to_string()),
            Value::Float(f) => Ok(f.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            other => Err(format!("returned a {}, not a string", other.type_of())),
        }
    }
}

/// What `need` asks of `json` as a CEL value, spending one unit of `budget` per JSON
/// value converted; `None` once it is spent. An object read in part keeps only the
/// fields asked for; anything else asked for at all is converted whole.
fn json_to_cel(json: &Json, need: &Need, budget: &mut usize) -> Option<Value> {
    *budget = budget.checked_sub(1)?;
    Some(match (json, need) {
        // Nothing reads it: what it is bound to cannot matter.
        (_, Need::Nothing) => Value::Null,
        (Json::Object(fields), Need::Fields(wanted)) => {
            let mut map = HashMap::with_capacity(wanted.len());
            for (name, need) in wanted {
                if let Some(value) = fields.get(name) {
                    map.insert(Key::from(name.clone()), json_to_cel(value, need, budget)?);
                }
            }
            Value::from(map)
        }
        (Json::Null, _) => Value::Null,
        (Json::Bool(b), _) => Value::Bool(*b),
        (Json::Number(n), _) => {
            if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else {
                Value::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        (Json::String(s), _) => Value::from(s.as_str()),
        (Json::Array(items), _) => {
            let mut list = Vec::with_capacity(items.len());
            for item in items {
                list.push(json_to_cel(item, &Need::Whole, budget)?);
            }
            Value::List(Arc::new(list))
        }
        (Json::Object(fields), Need::Whole) => {
            let mut map = HashMap::with_capacity(fields.len());
            for (k, v) in fields {
                map.insert(Key::from(k.clone()), json_to_cel(v, &Need::Whole, budget)?);
            }
            Value::from(map)
        }
    })
}

/// The fields of a form-encoded body (`a=1&b=x+y`) as a JSON object of strings; the last
/// value of a repeated name wins. `None` when the bytes are not such a form.
pub fn form_fields(raw: &[u8]) -> Option<Json> {
    let text = std::str::from_utf8(raw).ok()?;
    let mut fields = serde_json::Map::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        fields.insert(percent_decode(name)?, Json::String(percent_decode(value)?));
    }
    Some(Json::Object(fields))
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = text.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests;

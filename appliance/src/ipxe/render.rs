//! Evaluation of parsed templates against a JSON context, with iPXE-safe escaping.
//!
//! Values are escaped by default: anything outside a conservative URL-safe set is
//! percent-encoded, so a value can never add a word, a `${setting}` expansion, or an
//! `&&`/`||` chain to an iPXE command line. Operator-written text (a kernel command line
//! from the config) opts out with `| raw`.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

use super::template::{Cond, Expr, Filter, Node, Operand, Path, Pos, Template, TemplateError};

/// Characters left as they are in iPXE-escaped output.
const IPXE_SAFE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b':')
    .remove(b'/')
    .remove(b'?')
    .remove(b'=')
    .remove(b',')
    .remove(b'@')
    .remove(b'+');

/// Characters left as they are in a URL query component.
const URL_SAFE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Escapes a value for the iPXE command line.
pub fn escape_ipxe(s: &str) -> String {
    utf8_percent_encode(s, IPXE_SAFE).to_string()
}

/// Text as an `echo` line may show it: see [`Filter::Text`].
fn readable(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            c if c.is_ascii_alphanumeric() => c,
            ' ' | '.' | ',' | ':' | ';' | '(' | ')' | '/' | '-' | '_' | '@' | '=' | '+' | '!'
            | '?' | '%' | '[' | ']' | '<' | '>' | '*' | '~' => c,
            c if c.is_whitespace() => ' ',
            _ => '_',
        })
        .collect()
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn text_of(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

struct Scope<'a> {
    root: &'a Value,
    locals: Vec<(String, Value)>,
    template: &'a Template,
}

impl Scope<'_> {
    fn err(&self, pos: Pos, message: String) -> TemplateError {
        TemplateError {
            template: self.template.name.clone(),
            pos,
            message,
        }
    }

    /// Looks a path up. An unknown *first* name is an error (a typo in the template); a
    /// missing key below a known object is null, so optional fields need no ceremony.
    fn lookup(&self, path: &Path, pos: Pos) -> Result<Value, TemplateError> {
        let (head, tail) = path
            .0
            .split_first()
            .ok_or_else(|| self.err(pos, "empty path".into()))?;
        let start = self
            .locals
            .iter()
            .rev()
            .find(|(n, _)| n == head)
            .map(|(_, v)| v)
            .or_else(|| self.root.get(head))
            .ok_or_else(|| self.err(pos, format!("unknown variable {head:?}")))?;
        let mut cur = start;
        for key in tail {
            match cur.get(key) {
                Some(v) => cur = v,
                None => return Ok(Value::Null),
            }
        }
        Ok(cur.clone())
    }

    fn operand(&self, o: &Operand, pos: Pos) -> Result<Value, TemplateError> {
        match o {
            Operand::Var(p) => self.lookup(p, pos),
            Operand::Str(s) => Ok(Value::String(s.clone())),
        }
    }

    fn cond(&self, c: &Cond, pos: Pos) -> Result<bool, TemplateError> {
        Ok(match c {
            Cond::Truthy(o) => truthy(&self.operand(o, pos)?),
            Cond::Eq(a, b) => text_of(&self.operand(a, pos)?) == text_of(&self.operand(b, pos)?),
            Cond::Ne(a, b) => text_of(&self.operand(a, pos)?) != text_of(&self.operand(b, pos)?),
            Cond::Not(c) => !self.cond(c, pos)?,
            Cond::And(a, b) => self.cond(a, pos)? && self.cond(b, pos)?,
            Cond::Or(a, b) => self.cond(a, pos)? || self.cond(b, pos)?,
        })
    }

    fn expr(&self, e: &Expr, pos: Pos, out: &mut String) -> Result<(), TemplateError> {
        let v = self.lookup(&e.path, pos)?;
        if matches!(v, Value::Array(_) | Value::Object(_)) {
            return Err(self.err(
                pos,
                format!("{} is a list or table, not a value", e.path.0.join(".")),
            ));
        }
        let mut s = text_of(&v);
        let mut escaped = false;
        for f in &e.filters {
            match f {
                Filter::Raw => escaped = true,
                Filter::Url => {
                    s = utf8_percent_encode(&s, URL_SAFE).to_string();
                    escaped = true;
                }
                Filter::Text => {
                    s = readable(&s);
                    escaped = true;
                }
                Filter::Upper => s = s.to_uppercase(),
                Filter::Lower => s = s.to_lowercase(),
            }
        }
        if escaped {
            out.push_str(&s);
        } else {
            out.push_str(&escape_ipxe(&s));
        }
        Ok(())
    }

    fn nodes(&mut self, nodes: &[Node], out: &mut String) -> Result<(), TemplateError> {
        for node in nodes {
            match node {
                Node::Text(t) => out.push_str(t),
                Node::Expr(e, pos) => self.expr(e, *pos, out)?,
                Node::If {
                    branches,
                    otherwise,
                    pos,
                } => {
                    let mut taken = false;
                    for (c, body) in branches {
                        if self.cond(c, *pos)? {
                            self.nodes(body, out)?;
                            taken = true;
                            break;
                        }
                    }
                    if !taken {
                        self.nodes(otherwise, out)?;
                    }
                }
                Node::For {
                    var,
                    iter,
                    body,
                    pos,
                } => {
                    let items = match self.lookup(iter, *pos)? {
                        Value::Array(a) => a,
                        Value::Null => Vec::new(),
                        _ => {
                            return Err(
                                self.err(*pos, format!("{} is not a list", iter.0.join(".")))
                            );
                        }
                    };
                    let n = items.len();
                    for (i, item) in items.into_iter().enumerate() {
                        let meta = serde_json::json!({"index": i + 1, "first": i == 0, "last": i + 1 == n});
                        self.locals.push(("loop".into(), meta));
                        self.locals.push((var.clone(), item));
                        let r = self.nodes(body, out);
                        self.locals.truncate(self.locals.len() - 2);
                        r?;
                    }
                }
            }
        }
        Ok(())
    }
}

impl Template {
    /// Renders against `context` (a JSON object of named values).
    pub fn render(&self, context: &Value) -> Result<String, TemplateError> {
        let mut out = String::with_capacity(512);
        Scope {
            root: context,
            locals: Vec::new(),
            template: self,
        }
        .nodes(&self.nodes, &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(src: &str, ctx: Value) -> Result<String, TemplateError> {
        Template::parse("t", src)?.render(&ctx)
    }

    #[test]
    fn text_is_readable_and_inert() {
        let ctx = serde_json::json!({"r": "server X's window (a b): ${x} && y || z \"q\" #\nnext"});
        assert_eq!(
            render("{{ r | text }}", ctx).unwrap(),
            "server X_s window (a b): __x_ __ y __ z _q_ _ next"
        );
    }

    #[test]
    fn escapes_values_but_not_raw() {
        let ctx = json!({"v": "a b${x}&&reboot||x\n#", "r": "console=ttyS0 quiet"});
        assert_eq!(
            render("{{ v }}", ctx.clone()).unwrap(),
            "a%20b%24%7Bx%7D%26%26reboot%7C%7Cx%0A%23"
        );
        assert_eq!(
            render("{{ r | raw }}", ctx.clone()).unwrap(),
            "console=ttyS0 quiet"
        );
        assert_eq!(
            render("{{ r | url }}", ctx).unwrap(),
            "console%3DttyS0%20quiet"
        );
    }

    #[test]
    fn conditionals_and_loops() {
        let ctx = json!({
            "s": {"accepted": true, "cordoned": false, "arch": "x86_64"},
            "l": [{"n": "a"}, {"n": "b"}],
        });
        let src = "{% if s.accepted and not s.cordoned %}\nyes\n{% endif %}\n\
                   {% if s.arch == \"arm64\" %}arm{% elif s.arch != 'x' %}x86{% else %}?{% endif %}\n\
                   {% for i in l %}{{ loop.index }}={{ i.n | upper }}{% if not loop.last %},{% endif %}{% endfor %}\n";
        assert_eq!(render(src, ctx).unwrap(), "yes\nx86\n1=A,2=B\n");
    }

    #[test]
    fn unknown_roots_fail_missing_keys_are_empty() {
        let ctx = json!({"server": {"labels": {}}});
        assert_eq!(
            render("[{{ server.labels.rack }}]", ctx.clone()).unwrap(),
            "[]"
        );
        let e = render("\n  {{ sever.uuid }}", ctx.clone()).unwrap_err();
        assert_eq!(e.pos, Pos { line: 2, column: 3 });
        assert!(e.message.contains("unknown variable \"sever\""));
        let e = render("{{ server }}", ctx).unwrap_err();
        assert!(e.message.contains("not a value"));
    }
}

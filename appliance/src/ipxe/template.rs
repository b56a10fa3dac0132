//! Syntax of the iPXE script template language and its parser.
//!
//! ```text
//! {{ machine.uuid }}                 value, escaped for the iPXE command line
//! {{ env.cmdline | raw }}            filters: raw, url, text, upper, lower
//! {% if server.accepted and not server.cordoned %} … {% elif x == "y" %} … {% else %} … {% endif %}
//! {% for initrd in env.initrds %} {{ initrd.url }} {{ loop.index }} {% endfor %}
//! {# a comment #}
//! ```
//! A block tag alone on its line takes the whole line with it, so templates read like the
//! scripts they produce. Tags are found by a plain scan; what is inside them (expressions,
//! conditions, loop headers) is parsed with nom. Errors carry line and column.

use std::fmt;

use nom::branch::alt;
use nom::bytes::complete::{tag, take_while, take_while1};
use nom::character::complete::{char, multispace0, multispace1};
use nom::combinator::{all_consuming, map, opt, recognize};
use nom::multi::{many0, separated_list1};
use nom::sequence::{delimited, pair, preceded, terminated};
use nom::{IResult, Parser};

/// A position in a template source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// A syntax or evaluation error, located in its template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("template {template:?}, {pos}: {message}")]
pub struct TemplateError {
    pub template: String,
    pub pos: Pos,
    pub message: String,
}

/// Output filters applied to a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// No escaping: for operator-written text such as a kernel command line.
    Raw,
    /// Percent-encode for a URL query component.
    Url,
    /// Readable text for an `echo` line: letters, digits, spaces and plain punctuation
    /// stay; whatever iPXE could read as syntax (`$`, `&`, `|`, quotes, `\`, `#`) or a
    /// line break becomes `_` or a space.
    Text,
    Upper,
    Lower,
}

/// A dotted variable path such as `server.labels.rack`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path(pub Vec<String>);

/// `path | filter | …`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expr {
    pub path: Path,
    pub filters: Vec<Filter>,
}

/// Operands of a comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operand {
    Var(Path),
    Str(String),
}

/// A condition in `if`/`elif`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    Truthy(Operand),
    Eq(Operand, Operand),
    Ne(Operand, Operand),
    Not(Box<Cond>),
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
}

/// A parsed template node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Text(String),
    Expr(Expr, Pos),
    If {
        branches: Vec<(Cond, Vec<Node>)>,
        otherwise: Vec<Node>,
        pos: Pos,
    },
    For {
        var: String,
        iter: Path,
        body: Vec<Node>,
        pos: Pos,
    },
}

/// A compiled template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub name: String,
    pub nodes: Vec<Node>,
}

// ---- inner grammar (nom) ----

fn ident(i: &str) -> IResult<&str, &str> {
    recognize(pair(
        take_while1(|c: char| c.is_ascii_alphabetic() || c == '_'),
        take_while(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
    ))
    .parse(i)
}

fn path(i: &str) -> IResult<&str, Path> {
    map(separated_list1(char('.'), ident), |parts| {
        Path(parts.into_iter().map(String::from).collect())
    })
    .parse(i)
}

fn filter(i: &str) -> IResult<&str, Filter> {
    preceded(
        (multispace0, char('|'), multispace0),
        alt((
            map(tag("raw"), |_| Filter::Raw),
            map(tag("url"), |_| Filter::Url),
            map(tag("text"), |_| Filter::Text),
            map(tag("upper"), |_| Filter::Upper),
            map(tag("lower"), |_| Filter::Lower),
        )),
    )
    .parse(i)
}

fn expr(i: &str) -> IResult<&str, Expr> {
    map(pair(path, many0(filter)), |(path, filters)| Expr {
        path,
        filters,
    })
    .parse(i)
}

fn string_lit(i: &str) -> IResult<&str, String> {
    alt((
        delimited(char('"'), take_while(|c| c != '"'), char('"')),
        delimited(char('\''), take_while(|c| c != '\''), char('\'')),
    ))
    .map(String::from)
    .parse(i)
}

fn operand(i: &str) -> IResult<&str, Operand> {
    alt((map(string_lit, Operand::Str), map(path, Operand::Var))).parse(i)
}

fn keyword<'a>(
    kw: &'static str,
) -> impl Parser<&'a str, Output = &'a str, Error = nom::error::Error<&'a str>> {
    terminated(tag(kw), multispace1)
}

fn atom(i: &str) -> IResult<&str, Cond> {
    alt((
        map(preceded(keyword("not"), atom), |c| Cond::Not(Box::new(c))),
        delimited(
            pair(char('('), multispace0),
            or_cond,
            pair(multispace0, char(')')),
        ),
        map(
            (
                operand,
                opt((
                    delimited(multispace0, alt((tag("=="), tag("!="))), multispace0),
                    operand,
                )),
            ),
            |(a, rest)| match rest {
                None => Cond::Truthy(a),
                Some(("==", b)) => Cond::Eq(a, b),
                Some((_, b)) => Cond::Ne(a, b),
            },
        ),
    ))
    .parse(i)
}

fn and_cond(i: &str) -> IResult<&str, Cond> {
    let (i, first) = atom(i)?;
    let (i, rest) = many0(preceded((multispace1, keyword("and")), atom)).parse(i)?;
    Ok((
        i,
        rest.into_iter()
            .fold(first, |a, b| Cond::And(Box::new(a), Box::new(b))),
    ))
}

fn or_cond(i: &str) -> IResult<&str, Cond> {
    let (i, first) = and_cond(i)?;
    let (i, rest) = many0(preceded((multispace1, keyword("or")), and_cond)).parse(i)?;
    Ok((
        i,
        rest.into_iter()
            .fold(first, |a, b| Cond::Or(Box::new(a), Box::new(b))),
    ))
}

/// A block statement inside `{% … %}`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stmt {
    If(Cond),
    Elif(Cond),
    Else,
    Endif,
    For(String, Path),
    Endfor,
}

fn stmt(i: &str) -> IResult<&str, Stmt> {
    alt((
        map(preceded(keyword("if"), or_cond), Stmt::If),
        map(preceded(keyword("elif"), or_cond), Stmt::Elif),
        map(tag("else"), |_| Stmt::Else),
        map(tag("endif"), |_| Stmt::Endif),
        map(
            (keyword("for"), ident, multispace1, keyword("in"), path),
            |(_, v, _, _, p)| Stmt::For(v.to_string(), p),
        ),
        map(tag("endfor"), |_| Stmt::Endfor),
    ))
    .parse(i)
}

fn parse_all<'a, T>(
    inner: &'a str,
    p: impl Parser<&'a str, Output = T, Error = nom::error::Error<&'a str>>,
) -> Option<T> {
    all_consuming(delimited(multispace0, p, multispace0))
        .parse(inner)
        .ok()
        .map(|(_, v)| v)
}

// ---- outer scan and tree building ----

enum Token<'a> {
    Text(&'a str),
    Expr(&'a str, usize),
    Stmt(&'a str, usize),
}

fn pos_at(src: &str, offset: usize) -> Pos {
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    Pos { line, column }
}

fn tokenize<'a>(name: &str, src: &'a str) -> Result<Vec<Token<'a>>, TemplateError> {
    let mut tokens = Vec::new();
    let mut rest = 0;
    while rest < src.len() {
        let Some(found) = ["{{", "{%", "{#"]
            .iter()
            .filter_map(|t| src[rest..].find(t).map(|o| rest + o))
            .min()
        else {
            tokens.push(Token::Text(&src[rest..]));
            break;
        };
        let close = match &src[found..found + 2] {
            "{{" => "}}",
            "{%" => "%}",
            _ => "#}",
        };
        let Some(end) = src[found + 2..].find(close).map(|o| found + 2 + o) else {
            return Err(TemplateError {
                template: name.to_string(),
                pos: pos_at(src, found),
                message: format!("{} is never closed with {close}", &src[found..found + 2]),
            });
        };
        let mut text = &src[rest..found];
        // A block tag alone on its line takes its indentation and its newline with it.
        let line_start = src[..found].rfind('\n').map_or(0, |n| n + 1).max(rest);
        let alone = close != "}}"
            && src[line_start..found]
                .chars()
                .all(|c| c == ' ' || c == '\t')
            && (line_start > rest || rest == 0 || src[..rest].ends_with('\n'))
            && {
                let after = src[end + 2..].trim_start_matches([' ', '\t']);
                after.is_empty() || after.starts_with('\n')
            };
        if alone {
            text = &text[..line_start - rest];
        }
        if !text.is_empty() {
            tokens.push(Token::Text(text));
        }
        let inner = &src[found + 2..end];
        match close {
            "}}" => tokens.push(Token::Expr(inner, found)),
            "%}" => tokens.push(Token::Stmt(inner, found)),
            _ => {}
        }
        rest = end + 2;
        if alone {
            let after = src[rest..].trim_start_matches([' ', '\t']);
            rest = src.len() - after.strip_prefix('\n').unwrap_or(after).len();
        }
    }
    Ok(tokens)
}

enum Frame {
    Root,
    If {
        branches: Vec<(Cond, Vec<Node>)>,
        current: Option<Cond>,
        pos: Pos,
    },
    For {
        var: String,
        iter: Path,
        pos: Pos,
    },
}

impl Template {
    /// Parses `src`; `name` labels errors.
    pub fn parse(name: &str, src: &str) -> Result<Template, TemplateError> {
        let err = |offset: usize, message: String| TemplateError {
            template: name.to_string(),
            pos: pos_at(src, offset),
            message,
        };
        let mut stack: Vec<(Frame, Vec<Node>)> = vec![(Frame::Root, Vec::new())];
        for token in tokenize(name, src)? {
            match token {
                Token::Text(t) => top(&mut stack).push(Node::Text(t.to_string())),
                Token::Expr(inner, at) => {
                    let e = parse_all(inner, expr).ok_or_else(|| {
                        err(at, format!("cannot parse expression {:?}", inner.trim()))
                    })?;
                    top(&mut stack).push(Node::Expr(e, pos_at(src, at)));
                }
                Token::Stmt(inner, at) => {
                    let s = parse_all(inner, stmt).ok_or_else(|| {
                        err(at, format!("cannot parse statement {:?}", inner.trim()))
                    })?;
                    let pos = pos_at(src, at);
                    match s {
                        Stmt::If(c) => stack.push((
                            Frame::If {
                                branches: Vec::new(),
                                current: Some(c),
                                pos,
                            },
                            Vec::new(),
                        )),
                        Stmt::For(var, iter) => {
                            stack.push((Frame::For { var, iter, pos }, Vec::new()))
                        }
                        Stmt::Elif(c) => match stack.last_mut() {
                            Some((
                                Frame::If {
                                    branches, current, ..
                                },
                                body,
                            )) if current.is_some() => {
                                if let Some(prev) = current.replace(c) {
                                    branches.push((prev, std::mem::take(body)));
                                }
                            }
                            _ => return Err(err(at, "elif without a matching if".into())),
                        },
                        Stmt::Else => match stack.last_mut() {
                            Some((
                                Frame::If {
                                    branches, current, ..
                                },
                                body,
                            )) if current.is_some() => {
                                if let Some(prev) = current.take() {
                                    branches.push((prev, std::mem::take(body)));
                                }
                            }
                            _ => return Err(err(at, "else without a matching if".into())),
                        },
                        Stmt::Endif => match stack.pop() {
                            Some((
                                Frame::If {
                                    mut branches,
                                    current,
                                    pos,
                                },
                                body,
                            )) => {
                                let otherwise = match current {
                                    Some(c) => {
                                        branches.push((c, body));
                                        Vec::new()
                                    }
                                    None => body,
                                };
                                top(&mut stack).push(Node::If {
                                    branches,
                                    otherwise,
                                    pos,
                                });
                            }
                            _ => return Err(err(at, "endif without a matching if".into())),
                        },
                        Stmt::Endfor => match stack.pop() {
                            Some((Frame::For { var, iter, pos }, body)) => {
                                top(&mut stack).push(Node::For {
                                    var,
                                    iter,
                                    body,
                                    pos,
                                })
                            }
                            _ => return Err(err(at, "endfor without a matching for".into())),
                        },
                    }
                }
            }
        }
        match stack.pop() {
            Some((Frame::Root, nodes)) if stack.is_empty() => Ok(Template {
                name: name.to_string(),
                nodes,
            }),
            Some((Frame::If { pos, .. }, _)) => Err(TemplateError {
                template: name.to_string(),
                pos,
                message: "if is never closed with endif".into(),
            }),
            Some((Frame::For { pos, .. }, _)) => Err(TemplateError {
                template: name.to_string(),
                pos,
                message: "for is never closed with endfor".into(),
            }),
            _ => Err(err(0, "unbalanced blocks".into())),
        }
    }
}

fn top(stack: &mut [(Frame, Vec<Node>)]) -> &mut Vec<Node> {
    // The root frame is never popped before the end, so the stack is never empty here.
    &mut stack
        .last_mut()
        .expect("template stack holds the root frame")
        .1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nested_blocks() {
        let t = Template::parse(
            "t",
            "#!ipxe\n{% if a and not b %}\n  x {{ y | raw }}\n{% elif c == \"d\" %}\ne\n{% else %}\n{% for i in l %}{{ i.url }}{% endfor %}\n{% endif %}\nend\n",
        )
        .unwrap();
        assert_eq!(t.nodes.len(), 3, "{:#?}", t.nodes);
        match &t.nodes[1] {
            Node::If {
                branches,
                otherwise,
                ..
            } => {
                assert_eq!(branches.len(), 2);
                assert_eq!(
                    branches[0].1,
                    vec![
                        Node::Text("  x ".into()),
                        Node::Expr(
                            Expr {
                                path: Path(vec!["y".into()]),
                                filters: vec![Filter::Raw]
                            },
                            Pos { line: 3, column: 5 },
                        ),
                        Node::Text("\n".into())
                    ]
                );
                assert!(matches!(otherwise[0], Node::For { .. }));
            }
            other => panic!("expected if, got {other:?}"),
        }
    }

    #[test]
    fn errors_carry_line_and_column() {
        let e = Template::parse("t", "ok\n  {{ a b }}").unwrap_err();
        assert_eq!(e.pos, Pos { line: 2, column: 3 });
        assert!(e.message.contains("cannot parse expression"), "{e}");
        let e = Template::parse("t", "a\n{% if x %}\nb").unwrap_err();
        assert_eq!(
            (e.pos.line, e.message.as_str()),
            (2, "if is never closed with endif")
        );
        let e = Template::parse("t", "{% endfor %}").unwrap_err();
        assert!(e.message.contains("endfor without"), "{e}");
        let e = Template::parse("t", "x {{ open").unwrap_err();
        assert_eq!(e.pos.column, 3);
        let e = Template::parse("t", "{% else %}").unwrap_err();
        assert!(e.message.contains("else without"));
        let e = Template::parse("t", "{{ a | shout }}").unwrap_err();
        assert!(
            e.to_string().contains("template \"t\", line 1, column 1"),
            "{e}"
        );
    }
}

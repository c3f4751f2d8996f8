//! The default, rule-based extractor of memories from what a user says.
//!
//! It reads the user's messages only (never the model's), sentence by
//! sentence, and skips questions. Rules, matched case-insensitively at the
//! start of a sentence or after a comma (in this order, first match wins):
//!
//! | the user says | memory | kind | subject | relevance | importance |
//! | --- | --- | --- | --- | --- | --- |
//! | `my name is X`, `call me X`, `i'm called X` | `User's name is X` / `User wants to be called X` | fact | `name` | 0.8 | 0.9 |
//! | `my favourite/favorite T is X` | `User's favourite T is X` | preference | `favourite T` | 0.8 | 0.7 |
//! | `i (now/really/still) prefer X (over/to/rather than Y)` | `User prefers X (over Y)` | preference | `preference: C` | 0.9 | 0.8 |
//! | `i live in X`, `i moved to X` | `User lives in X` | fact | `home` | 0.8 | 0.7 |
//! | `i'm from X`, `i am from X`, `i come from X` | `User is from X` | fact | `origin` | 0.7 | 0.6 |
//! | `i work as X`, `i work at X`, `i'm a X by profession` | `User works as/at X` | fact | `work` | 0.7 | 0.6 |
//! | `i'm allergic to X` | `User is allergic to X` | fact | `allergy: X` | 0.9 | 0.9 |
//! | `i like/love/enjoy X` | `User likes X` | preference | `likes: X` | 0.7 | 0.5 |
//! | `i don't like X`, `i dislike X`, `i hate X` | `User dislikes X` | preference | `likes: X` | 0.7 | 0.5 |
//! | `remember (that) X` | `X` | note | — | 0.9 | 0.9 |
//!
//! `C`, the subject of a preference, is the category of X (or of Y) when
//! it is a known word — programming language, editor, operating system,
//! drink, pet — else X itself; so "I now prefer Rust" supersedes "I prefer
//! Python over JavaScript" (both `preference: programming language`).
//! X is the rest of the clause, without trailing punctuation, at most 80
//! characters.

use crate::store::MemoryKind;

/// A memory the extractor proposes (scored and stored, or not, by [`super::Memory`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// The text to remember.
    pub content: String,
    /// Its kind.
    pub kind: MemoryKind,
    /// What it is about (for superseding), if anything.
    pub subject: Option<String>,
    /// Relevance in [0, 1].
    pub relevance: f64,
    /// Importance in [0, 1].
    pub importance: f64,
}

/// Finds candidate memories in what a user said. Plug in your own
/// (e.g. model-based) with [`super::MemoryBuilder::extractor`].
pub trait MemoryExtractor: Send + Sync + 'static {
    /// The candidates in one user message.
    fn extract(&self, text: &str) -> Vec<Candidate>;
}

impl<F> MemoryExtractor for F
where
    F: Fn(&str) -> Vec<Candidate> + Send + Sync + 'static,
{
    fn extract(&self, text: &str) -> Vec<Candidate> {
        self(text)
    }
}

/// The default extractor: the rules in the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct RuleExtractor;

const CATEGORIES: &[(&str, &[&str])] = &[
    (
        "programming language",
        &[
            "c",
            "c#",
            "c++",
            "clojure",
            "cobol",
            "dart",
            "elixir",
            "erlang",
            "f#",
            "fortran",
            "go",
            "golang",
            "haskell",
            "java",
            "javascript",
            "js",
            "julia",
            "kotlin",
            "lisp",
            "lua",
            "ocaml",
            "perl",
            "php",
            "python",
            "r",
            "ruby",
            "rust",
            "scala",
            "swift",
            "typescript",
            "zig",
        ],
    ),
    (
        "editor",
        &[
            "emacs", "helix", "intellij", "nano", "neovim", "vim", "vs code", "vscode", "zed",
        ],
    ),
    (
        "operating system",
        &[
            "linux", "macos", "windows", "ubuntu", "debian", "fedora", "freebsd", "android", "ios",
        ],
    ),
    (
        "drink",
        &["coffee", "tea", "water", "juice", "beer", "wine"],
    ),
    ("pet", &["cats", "dogs", "cat", "dog"]),
];

fn category(thing: &str) -> Option<&'static str> {
    let t = thing.trim().to_lowercase();
    CATEGORIES
        .iter()
        .find(|(_, words)| words.contains(&t.as_str()))
        .map(|(c, _)| *c)
}

/// The clause after a trigger: up to the end, trailing punctuation and
/// quotes removed, at most 80 characters; `None` if empty.
fn rest(s: &str) -> Option<String> {
    let t = s
        .trim()
        .trim_end_matches(['.', '!', ',', ';', ':', '"', '\''])
        .trim();
    if t.is_empty() {
        return None;
    }
    Some(t.chars().take(80).collect())
}

fn cand(
    content: String,
    kind: MemoryKind,
    subject: Option<String>,
    rel: f64,
    imp: f64,
) -> Candidate {
    Candidate {
        content,
        kind,
        subject,
        relevance: rel,
        importance: imp,
    }
}

/// If `l` (the lower-cased clause) starts with one of `triggers`, the rest
/// of the original clause `s` after it.
fn after<'a>(s: &'a str, l: &str, triggers: &[&str]) -> Option<&'a str> {
    triggers
        .iter()
        .find(|t| l.starts_with(**t))
        .map(|t| &s[t.len()..])
}

fn clause(s: &str) -> Option<Candidate> {
    // ASCII lower-casing keeps byte offsets, so `l` indexes `s`.
    let l = s.to_ascii_lowercase();
    let l = l.as_str();
    if let Some(x) = after(s, l, &["my name is ", "my name's "]) {
        let name = rest(x)?;
        return Some(cand(
            format!("User's name is {name}"),
            MemoryKind::Fact,
            Some("name".into()),
            0.8,
            0.9,
        ));
    }
    if let Some(x) = after(s, l, &["call me ", "i'm called ", "i am called "]) {
        let name = rest(x)?;
        return Some(cand(
            format!("User wants to be called {name}"),
            MemoryKind::Fact,
            Some("name".into()),
            0.8,
            0.9,
        ));
    }
    if let Some(x) = after(s, l, &["my favourite ", "my favorite "]) {
        let lx = x.to_ascii_lowercase();
        let at = lx.find(" is ").or_else(|| lx.find(" are "))?;
        let verb = if lx[at..].starts_with(" is ") { 4 } else { 5 };
        let thing = x[..at].trim().to_lowercase();
        let value = rest(&x[at + verb..])?;
        if thing.is_empty() {
            return None;
        }
        return Some(cand(
            format!("User's favourite {thing} is {value}"),
            MemoryKind::Preference,
            Some(format!("favourite {thing}")),
            0.8,
            0.7,
        ));
    }
    if let Some(x) = after(
        s,
        l,
        &[
            "i now prefer ",
            "i really prefer ",
            "i still prefer ",
            "i prefer ",
        ],
    ) {
        let lx = x.to_ascii_lowercase();
        let (what, over) = match [" over ", " rather than ", " to ", " instead of "]
            .iter()
            .find_map(|sep| lx.find(sep).map(|i| (i, sep.len())))
        {
            Some((i, n)) => (x[..i].trim(), rest(&x[i + n..])),
            None => (x, None),
        };
        let what = rest(what)?;
        let subject = category(&what)
            .or_else(|| over.as_deref().and_then(category))
            .map(str::to_string)
            .unwrap_or_else(|| what.to_lowercase());
        let content = match &over {
            Some(o) => format!("User prefers {what} over {o}"),
            None => format!("User prefers {what}"),
        };
        return Some(cand(
            content,
            MemoryKind::Preference,
            Some(format!("preference: {subject}")),
            0.9,
            0.8,
        ));
    }
    if let Some(x) = after(s, l, &["i live in ", "i now live in ", "i moved to "]) {
        let place = rest(x)?;
        return Some(cand(
            format!("User lives in {place}"),
            MemoryKind::Fact,
            Some("home".into()),
            0.8,
            0.7,
        ));
    }
    if let Some(x) = after(s, l, &["i'm from ", "i am from ", "i come from "]) {
        let place = rest(x)?;
        return Some(cand(
            format!("User is from {place}"),
            MemoryKind::Fact,
            Some("origin".into()),
            0.7,
            0.6,
        ));
    }
    if let Some(x) = after(s, l, &["i work as ", "i work at ", "i work for "]) {
        let how = &l[..l.len() - x.len()];
        let prep = how.trim_end().rsplit(' ').next().unwrap_or("as");
        let job = rest(x)?;
        return Some(cand(
            format!("User works {prep} {job}"),
            MemoryKind::Fact,
            Some("work".into()),
            0.7,
            0.6,
        ));
    }
    if let Some(x) = after(s, l, &["i'm allergic to ", "i am allergic to "]) {
        let what = rest(x)?;
        let key = what.to_lowercase();
        return Some(cand(
            format!("User is allergic to {what}"),
            MemoryKind::Fact,
            Some(format!("allergy: {key}")),
            0.9,
            0.9,
        ));
    }
    if let Some(x) = after(
        s,
        l,
        &["i don't like ", "i do not like ", "i dislike ", "i hate "],
    ) {
        let what = rest(x)?;
        let key = what.to_lowercase();
        return Some(cand(
            format!("User dislikes {what}"),
            MemoryKind::Preference,
            Some(format!("likes: {key}")),
            0.7,
            0.5,
        ));
    }
    if let Some(x) = after(s, l, &["i like ", "i love ", "i enjoy ", "i really like "]) {
        let what = rest(x)?;
        let key = what.to_lowercase();
        return Some(cand(
            format!("User likes {what}"),
            MemoryKind::Preference,
            Some(format!("likes: {key}")),
            0.7,
            0.5,
        ));
    }
    if let Some(x) = after(
        s,
        l,
        &[
            "remember that ",
            "please remember that ",
            "remember ",
            "please remember ",
        ],
    ) {
        let what = rest(x)?;
        return Some(cand(what, MemoryKind::Note, None, 0.9, 0.9));
    }
    None
}

impl MemoryExtractor for RuleExtractor {
    fn extract(&self, text: &str) -> Vec<Candidate> {
        let mut out: Vec<Candidate> = Vec::new();
        for sentence in text.split_inclusive(['.', '!', '?', '\n', ';']) {
            let sentence = sentence.trim();
            if sentence.ends_with('?') {
                continue; // a question states nothing
            }
            for part in sentence.split(", ") {
                let part = part
                    .trim_start_matches(|c: char| !c.is_alphanumeric())
                    .trim();
                let part = ["and ", "but ", "also ", "so ", "oh ", "well "]
                    .iter()
                    .find_map(|w| {
                        part.get(..w.len())
                            .filter(|p| p.eq_ignore_ascii_case(w))
                            .map(|_| &part[w.len()..])
                    })
                    .unwrap_or(part);
                if let Some(c) = clause(part) {
                    if !out.iter().any(|o| o.content == c.content) {
                        out.push(c);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Candidate {
        let v = RuleExtractor.extract(text);
        assert_eq!(v.len(), 1, "{text}: {v:?}");
        v.into_iter().next().unwrap()
    }

    #[test]
    fn rules() {
        let c = one("I prefer Python over JavaScript");
        assert_eq!(c.content, "User prefers Python over JavaScript");
        assert_eq!(
            c.subject.as_deref(),
            Some("preference: programming language")
        );
        assert_eq!(
            one("I now prefer Rust.").subject.as_deref(),
            Some("preference: programming language")
        );
        let c = one("My favourite colour is blue");
        assert_eq!(c.content, "User's favourite colour is blue");
        assert_eq!(c.subject.as_deref(), Some("favourite colour"));
        assert_eq!(one("Hello! I live in Lyon.").content, "User lives in Lyon");
        assert_eq!(one("call me Al").content, "User wants to be called Al");
        assert_eq!(one("My name is Alice").content, "User's name is Alice");
        assert_eq!(one("I work as a nurse").content, "User works as a nurse");
        assert_eq!(
            one("Remember that the meeting is on Friday").content,
            "the meeting is on Friday"
        );
        assert_eq!(
            one("Thanks, and I don't like olives").content,
            "User dislikes olives"
        );
        assert!(RuleExtractor
            .extract("What's my favourite programming language?")
            .is_empty());
        assert!(RuleExtractor.extract("Do I prefer tea?").is_empty());
        assert!(RuleExtractor.extract("The weather is nice").is_empty());
        let two = RuleExtractor.extract("My name is Bo. I live in Oslo!");
        assert_eq!(two.len(), 2);
    }

    #[test]
    fn unicode_is_safe() {
        let c = one("I live in Zürich, Schweiz 🇨🇭");
        assert_eq!(c.content, "User lives in Zürich");
        let _ = RuleExtractor.extract("Ich heiße Jürgen. MY FAVOURITE ÄPFEL IS rot");
    }
}

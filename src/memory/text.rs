//! Words: search terms, topics (keyword extraction) and the token estimate.

use std::collections::HashMap;

/// Words too common to search for or to call a topic.
const STOPWORDS: &[&str] = &[
    "a",
    "about",
    "above",
    "after",
    "again",
    "all",
    "also",
    "am",
    "an",
    "and",
    "any",
    "are",
    "as",
    "at",
    "be",
    "because",
    "been",
    "before",
    "being",
    "below",
    "between",
    "both",
    "but",
    "by",
    "can",
    "could",
    "did",
    "do",
    "does",
    "doing",
    "don",
    "done",
    "down",
    "during",
    "each",
    "else",
    "even",
    "ever",
    "few",
    "for",
    "from",
    "further",
    "get",
    "got",
    "had",
    "has",
    "have",
    "having",
    "he",
    "hello",
    "her",
    "here",
    "hers",
    "herself",
    "hi",
    "him",
    "himself",
    "his",
    "how",
    "i",
    "if",
    "im",
    "in",
    "into",
    "is",
    "isn",
    "it",
    "its",
    "itself",
    "just",
    "know",
    "let",
    "like",
    "ll",
    "me",
    "more",
    "most",
    "much",
    "my",
    "myself",
    "no",
    "nor",
    "not",
    "now",
    "of",
    "off",
    "ok",
    "okay",
    "on",
    "once",
    "only",
    "or",
    "other",
    "our",
    "ours",
    "ourselves",
    "out",
    "over",
    "own",
    "please",
    "re",
    "really",
    "same",
    "say",
    "she",
    "should",
    "so",
    "some",
    "such",
    "tell",
    "than",
    "thank",
    "thanks",
    "that",
    "the",
    "their",
    "theirs",
    "them",
    "themselves",
    "then",
    "there",
    "these",
    "they",
    "thing",
    "things",
    "think",
    "this",
    "those",
    "through",
    "to",
    "too",
    "under",
    "until",
    "up",
    "us",
    "ve",
    "very",
    "want",
    "was",
    "we",
    "well",
    "were",
    "what",
    "when",
    "where",
    "which",
    "while",
    "who",
    "whom",
    "why",
    "will",
    "with",
    "would",
    "yes",
    "you",
    "your",
    "yours",
    "yourself",
    "yourselves",
];

/// Whether `word` (lower case) is a stop word.
pub fn is_stopword(word: &str) -> bool {
    STOPWORDS.binary_search(&word).is_ok()
}

/// The words of `text`: runs of letters and digits, lower-cased.
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
}

/// Most terms a search uses (the first ones of the query).
pub const MAX_SEARCH_TERMS: usize = 16;

/// The terms a memory search looks for: the words of `query` of two or more
/// characters that are not stop words, without repeats, at most
/// [`MAX_SEARCH_TERMS`]. Every backend searches for these, so a store
/// matches any memory containing one of them. Only letters and digits, so
/// they are safe to quote in an FTS5 query.
pub fn search_terms(query: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for w in words(query) {
        if w.chars().count() < 2 || is_stopword(&w) || out.contains(&w) {
            continue;
        }
        out.push(w);
        if out.len() == MAX_SEARCH_TERMS {
            break;
        }
    }
    out
}

/// The topics of some texts, most frequent first (ties alphabetical): words
/// of three or more letters that are not stop words and not numbers,
/// counted over all texts. No model involved.
pub fn topics<'a>(texts: impl IntoIterator<Item = &'a str>, limit: usize) -> Vec<(String, u32)> {
    let mut counts: HashMap<String, u32> = HashMap::new();
    for t in texts {
        for w in words(t) {
            if w.chars().count() < 3 || is_stopword(&w) || w.chars().all(|c| c.is_numeric()) {
                continue;
            }
            *counts.entry(w).or_default() += 1;
        }
    }
    let mut v: Vec<(String, u32)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(limit);
    v
}

/// Tokens a prompt message is counted as, for `memory.max_context_tokens`:
/// `ceil(characters / 4) + 4` — about four characters a token for English
/// text, plus a fixed overhead per message for the role and separators
/// that chat formats add. An estimate, exact to this definition (no
/// tokenizer crate is a dependency); real tokenizers differ by model.
pub fn estimate_message_tokens(content: &str) -> usize {
    content.chars().count().div_ceil(4) + MESSAGE_OVERHEAD_TOKENS
}

/// The per-message overhead of [`estimate_message_tokens`].
pub const MESSAGE_OVERHEAD_TOKENS: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopwords_are_sorted() {
        let mut sorted = STOPWORDS.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, STOPWORDS);
    }

    #[test]
    fn terms_and_topics() {
        assert_eq!(
            search_terms("What's my favourite programming language? Python!"),
            ["favourite", "programming", "language", "python"]
        );
        assert!(search_terms("hi, what is it?").is_empty());
        let t = topics(["Rust traits", "rust lifetimes and traits", "RUST"], 2);
        assert_eq!(t, [("rust".to_string(), 3), ("traits".to_string(), 2)]);
    }

    #[test]
    fn token_estimate() {
        assert_eq!(estimate_message_tokens(""), 4);
        assert_eq!(estimate_message_tokens("abcd"), 5);
        assert_eq!(estimate_message_tokens("abcde"), 6);
        assert_eq!(estimate_message_tokens("日本語"), 5);
    }
}

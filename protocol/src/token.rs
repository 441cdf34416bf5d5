//! Bearer tokens as both sides check them: by sha256 digest, compared in constant time.
//!
//! Comparing digests rather than the tokens means the comparison's running time depends on
//! neither the secret's length nor where a guess first differs, and the secret need not be
//! kept in clear by the side that checks it.

use sha2::{Digest, Sha256};

/// sha256 of a token.
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Whether two digests are equal, looking at every byte whatever the answer.
pub fn digests_match(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_match_only_the_same_token() {
        let a = token_digest("secret");
        assert!(digests_match(&a, &token_digest("secret")));
        assert!(!digests_match(&a, &token_digest("secreT")));
        assert!(!digests_match(&a, &token_digest("")));
    }
}

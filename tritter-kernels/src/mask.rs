//! Attention masks in FlexAttention's vocabulary, without a dense `q × kv` matrix.
//!
//! A [`MaskMod`] says whether query position `q` may see key position `kv`; queries are
//! the last `q_len` of `kv_len` positions (a decode step's query sits at `kv_len − 1`).
//! Atoms: causal `q ≥ kv`, window `q − kv < W`, document `doc[q] = doc[kv]` (packed
//! sequences), below `kv < S`; combined with `and` / `or`. The named masks:
//! sliding window = causal ∧ window; sinks = causal ∧ (below S ∨ window); prefix-LM =
//! below P ∨ causal.
//!
//! Kernels evaluate a mask in disjunctive normal form ([`MaskMod::terms`]: an `or` of
//! `and`s of atoms) and skip work by a [`BlockMask`]: per (query block, key block) tile,
//! empty (skipped), full (no per-element test) or partial.

use std::sync::Arc;

/// Term flags: which atoms a term requires.
pub const ATOM_CAUSAL: i32 = 1;
pub const ATOM_WINDOW: i32 = 2;
pub const ATOM_DOCUMENT: i32 = 4;
pub const ATOM_BELOW: i32 = 8;

#[derive(Debug, Clone, PartialEq)]
pub enum MaskMod {
    /// Every key visible.
    Full,
    /// `q ≥ kv`.
    Causal,
    /// `q − kv < W` (with [`MaskMod::Causal`]: a sliding window of `W` keys).
    Window(usize),
    /// `doc[q] == doc[kv]`.
    Document,
    /// `kv < S`.
    Below(usize),
    And(Box<MaskMod>, Box<MaskMod>),
    Or(Box<MaskMod>, Box<MaskMod>),
}

/// One `and` of atoms: `flags` says which, with their parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Term {
    pub flags: i32,
    pub window: usize,
    pub below: usize,
}

impl Term {
    const ALL: Term = Term {
        flags: 0,
        window: usize::MAX,
        below: usize::MAX,
    };

    fn and(self, other: Term) -> Term {
        Term {
            flags: self.flags | other.flags,
            window: self.window.min(other.window),
            below: self.below.min(other.below),
        }
    }

    fn allows(&self, q: usize, kv: usize, docs: Option<&[i32]>) -> bool {
        (self.flags & ATOM_CAUSAL == 0 || q >= kv)
            && (self.flags & ATOM_WINDOW == 0 || q < kv || q - kv < self.window)
            && (self.flags & ATOM_BELOW == 0 || kv < self.below)
            && (self.flags & ATOM_DOCUMENT == 0 || docs.is_none_or(|d| d[q] == d[kv]))
    }

    /// Whether every / some `(q, kv)` of the tile `qs × kvs` is allowed, decided from
    /// its corners (each atom but the document is a half-plane, so the term is convex)
    /// and the documents' ranges (document ids never decrease along a packed sequence).
    fn classify(&self, qs: (usize, usize), kvs: (usize, usize), docs: Option<&[i32]>) -> Tile {
        let corners = [(qs.0, kvs.0), (qs.0, kvs.1), (qs.1, kvs.0), (qs.1, kvs.1)];
        let geometric = Term {
            flags: self.flags & !ATOM_DOCUMENT,
            ..*self
        };
        let mut tile = if corners.iter().all(|&(q, kv)| geometric.allows(q, kv, None)) {
            Tile::Full
        } else {
            // Empty when all four corners fail one half-plane.
            let half_planes = [ATOM_CAUSAL, ATOM_WINDOW, ATOM_BELOW];
            let empty = half_planes.iter().any(|&atom| {
                self.flags & atom != 0
                    && corners.iter().all(|&(q, kv)| {
                        !Term {
                            flags: atom,
                            ..*self
                        }
                        .allows(q, kv, None)
                    })
            });
            if empty {
                Tile::Empty
            } else {
                Tile::Partial
            }
        };
        if tile != Tile::Empty && self.flags & ATOM_DOCUMENT != 0 {
            if let Some(d) = docs {
                let (q_lo, q_hi) = (d[qs.0], d[qs.1]);
                let (k_lo, k_hi) = (d[kvs.0], d[kvs.1]);
                if q_hi < k_lo || k_hi < q_lo {
                    tile = Tile::Empty;
                } else if !(q_lo == q_hi && k_lo == k_hi && q_lo == k_lo) {
                    tile = Tile::Partial;
                }
            }
        }
        tile
    }
}

/// How much of a tile a mask allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tile {
    Empty = 0,
    Full = 1,
    Partial = 2,
}

impl MaskMod {
    pub fn causal() -> Self {
        MaskMod::Causal
    }

    /// Each query sees itself and the `window − 1` keys before it.
    pub fn sliding_window(window: usize) -> Self {
        MaskMod::Causal.and(MaskMod::Window(window))
    }

    /// Causal attention within each packed document.
    pub fn document_causal() -> Self {
        MaskMod::Causal.and(MaskMod::Document)
    }

    /// The first `sinks` keys and a sliding window of `window`, never the future.
    pub fn sinks(sinks: usize, window: usize) -> Self {
        MaskMod::Causal.and(MaskMod::Below(sinks).or(MaskMod::Window(window)))
    }

    /// Bidirectional over the first `prefix` keys, causal after.
    pub fn prefix_lm(prefix: usize) -> Self {
        MaskMod::Below(prefix).or(MaskMod::Causal)
    }

    pub fn and(self, other: MaskMod) -> Self {
        MaskMod::And(Box::new(self), Box::new(other))
    }

    pub fn or(self, other: MaskMod) -> Self {
        MaskMod::Or(Box::new(self), Box::new(other))
    }

    /// Whether the mask needs document ids.
    pub fn uses_documents(&self) -> bool {
        self.terms().iter().any(|t| t.flags & ATOM_DOCUMENT != 0)
    }

    /// The mask as an `or` of `and`s of atoms.
    pub fn terms(&self) -> Vec<Term> {
        match self {
            MaskMod::Full => vec![Term::ALL],
            MaskMod::Causal => vec![Term {
                flags: ATOM_CAUSAL,
                ..Term::ALL
            }],
            MaskMod::Window(w) => vec![Term {
                flags: ATOM_WINDOW,
                window: *w,
                ..Term::ALL
            }],
            MaskMod::Document => vec![Term {
                flags: ATOM_DOCUMENT,
                ..Term::ALL
            }],
            MaskMod::Below(s) => vec![Term {
                flags: ATOM_BELOW,
                below: *s,
                ..Term::ALL
            }],
            MaskMod::Or(a, b) => {
                let mut terms = a.terms();
                terms.extend(b.terms());
                terms
            }
            MaskMod::And(a, b) => {
                let (a, b) = (a.terms(), b.terms());
                a.iter()
                    .flat_map(|x| b.iter().map(move |y| x.and(*y)))
                    .collect()
            }
        }
    }

    /// Whether query position `q` may see key position `kv` (`docs`: the document id of
    /// each position).
    pub fn allows(&self, q: usize, kv: usize, docs: Option<&[i32]>) -> bool {
        match self {
            MaskMod::Full => true,
            MaskMod::Causal => q >= kv,
            MaskMod::Window(w) => q < kv || q - kv < *w,
            MaskMod::Document => docs.is_none_or(|d| d[q] == d[kv]),
            MaskMod::Below(s) => kv < *s,
            MaskMod::And(a, b) => a.allows(q, kv, docs) && b.allows(q, kv, docs),
            MaskMod::Or(a, b) => a.allows(q, kv, docs) || b.allows(q, kv, docs),
        }
    }
}

/// A mask for one attention call: the mask and, when it uses documents, the document id
/// of every key position of every sequence (`[batch, kv_len]`).
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionMask {
    pub mask: MaskMod,
    pub documents: Option<Arc<Vec<i32>>>,
}

impl AttentionMask {
    pub fn new(mask: MaskMod) -> Self {
        Self {
            mask,
            documents: None,
        }
    }

    pub fn with_documents(mask: MaskMod, documents: Vec<i32>) -> Self {
        Self {
            mask,
            documents: Some(Arc::new(documents)),
        }
    }

    fn docs(&self, b: usize, kv_len: usize) -> Option<&[i32]> {
        self.documents
            .as_ref()
            .map(|d| &d[b * kv_len..(b + 1) * kv_len])
    }

    /// `true` where masked, `[batch, q_len, kv_len]` row-major (the reference path).
    pub fn dense(&self, batch: usize, q_len: usize, kv_len: usize) -> Vec<bool> {
        let offset = kv_len - q_len;
        let mut out = Vec::with_capacity(batch * q_len * kv_len);
        for b in 0..batch {
            let docs = self.docs(b, kv_len);
            for i in 0..q_len {
                out.extend((0..kv_len).map(|j| !self.mask.allows(i + offset, j, docs)));
            }
        }
        out
    }

    /// The tile classes of the mask, `[batch, ceil(q_len / bq), ceil(kv_len / bk)]`.
    pub fn block_mask(
        &self,
        batch: usize,
        q_len: usize,
        kv_len: usize,
        bq: usize,
        bk: usize,
    ) -> BlockMask {
        let terms = self.mask.terms();
        let offset = kv_len - q_len;
        let (nqb, nkb) = (q_len.div_ceil(bq), kv_len.div_ceil(bk));
        let mut tiles = Vec::with_capacity(batch * nqb * nkb);
        for b in 0..batch {
            let docs = self.docs(b, kv_len);
            for qb in 0..nqb {
                let qs = (offset + qb * bq, offset + ((qb + 1) * bq).min(q_len) - 1);
                for kb in 0..nkb {
                    let kvs = (kb * bk, ((kb + 1) * bk).min(kv_len) - 1);
                    let classes: Vec<Tile> =
                        terms.iter().map(|t| t.classify(qs, kvs, docs)).collect();
                    tiles.push(if classes.contains(&Tile::Full) {
                        Tile::Full
                    } else if classes.iter().all(|&c| c == Tile::Empty) {
                        Tile::Empty
                    } else {
                        Tile::Partial
                    });
                }
            }
        }
        BlockMask {
            bq,
            bk,
            q_blocks: nqb,
            kv_blocks: nkb,
            tiles,
        }
    }
}

/// Per (query block, key block) tile: empty, full or partial.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockMask {
    pub bq: usize,
    pub bk: usize,
    pub q_blocks: usize,
    pub kv_blocks: usize,
    pub tiles: Vec<Tile>,
}

impl BlockMask {
    /// The fraction of tiles that are not empty.
    pub fn density(&self) -> f64 {
        let live = self.tiles.iter().filter(|&&t| t != Tile::Empty).count();
        live as f64 / self.tiles.len().max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masks() -> Vec<MaskMod> {
        vec![
            MaskMod::Full,
            MaskMod::causal(),
            MaskMod::sliding_window(5),
            MaskMod::document_causal(),
            MaskMod::sinks(3, 4),
            MaskMod::prefix_lm(7),
            MaskMod::prefix_lm(4).and(MaskMod::Document),
            MaskMod::sliding_window(3).or(MaskMod::Below(2).and(MaskMod::Document)),
        ]
    }

    /// Documents of lengths 5, 9, 1, 10 packed into 25 positions.
    fn documents() -> Vec<i32> {
        [5, 9, 1, 10]
            .iter()
            .enumerate()
            .flat_map(|(d, &n)| std::iter::repeat_n(d as i32, n))
            .collect()
    }

    #[test]
    fn terms_say_what_the_mask_says() {
        let docs = documents();
        for mask in masks() {
            let terms = mask.terms();
            for q in 0..docs.len() {
                for kv in 0..docs.len() {
                    let dnf = terms.iter().any(|t| t.allows(q, kv, Some(&docs)));
                    assert_eq!(
                        dnf,
                        mask.allows(q, kv, Some(&docs)),
                        "{mask:?} at ({q}, {kv})"
                    );
                }
            }
        }
        assert!(MaskMod::sinks(3, 4).allows(20, 1, None));
        assert!(!MaskMod::sinks(3, 4).allows(20, 10, None));
        assert!(
            !MaskMod::sinks(3, 4).allows(1, 2, None),
            "sinks never see the future"
        );
        assert!(MaskMod::prefix_lm(7).allows(2, 6, None));
    }

    #[test]
    fn block_classes_agree_with_every_element() {
        let docs = documents();
        let kv_len = docs.len();
        for mask in masks() {
            for q_len in [kv_len, 9, 1] {
                let m = AttentionMask::with_documents(mask.clone(), docs.clone());
                let dense = m.dense(1, q_len, kv_len);
                for (bq, bk) in [(4, 4), (3, 7), (16, 16)] {
                    let blocks = m.block_mask(1, q_len, kv_len, bq, bk);
                    for qb in 0..blocks.q_blocks {
                        for kb in 0..blocks.kv_blocks {
                            let cells: Vec<bool> = (qb * bq..((qb + 1) * bq).min(q_len))
                                .flat_map(|i| {
                                    (kb * bk..((kb + 1) * bk).min(kv_len)).map(move |j| (i, j))
                                })
                                .map(|(i, j)| !dense[i * kv_len + j])
                                .collect();
                            let tile = blocks.tiles[qb * blocks.kv_blocks + kb];
                            match tile {
                                Tile::Empty => assert!(cells.iter().all(|&a| !a), "{mask:?}"),
                                Tile::Full => assert!(cells.iter().all(|&a| a), "{mask:?}"),
                                Tile::Partial => {}
                            }
                        }
                    }
                }
            }
        }
        // A long causal mask skips about half its tiles.
        let causal = AttentionMask::new(MaskMod::causal()).block_mask(1, 1024, 1024, 64, 64);
        assert!(
            (causal.density() - 0.53).abs() < 0.01,
            "{}",
            causal.density()
        );
        let window =
            AttentionMask::new(MaskMod::sliding_window(128)).block_mask(1, 4096, 4096, 64, 64);
        assert!(window.density() < 0.05, "{}", window.density());
    }
}

//! A small raster canvas and PNG writer for plots people would rather
//! look at than read: lines, dots, rectangles and text in a built-in 5×7
//! bitmap font, encoded as an 8-bit RGB PNG (zlib and CRC-32 from flate2).
//! Enough for the load curve; not a general renderer.

use std::io::Write as _;

/// An RGB colour.
pub type Rgb = [u8; 3];

/// Parses `#rrggbb` (anything else is black).
pub fn rgb(hex: &str) -> Rgb {
    let h = hex.trim_start_matches('#');
    let c = |i: usize| {
        h.get(i..i + 2)
            .and_then(|s| u8::from_str_radix(s, 16).ok())
            .unwrap_or(0)
    };
    if h.len() == 6 {
        [c(0), c(2), c(4)]
    } else {
        [0, 0, 0]
    }
}

/// Where text is anchored horizontally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anchor {
    /// At its left edge.
    Start,
    /// At its middle.
    Middle,
    /// At its right edge.
    End,
}

/// A canvas of RGB pixels.
pub struct Canvas {
    w: usize,
    h: usize,
    px: Vec<Rgb>,
}

/// The glyph grid: 5 columns, 7 rows, one column of spacing.
const GW: usize = 5;
const GH: usize = 7;

/// The 5×7 glyphs, one row per byte, the leftmost column in bit 4.
/// Lower-case letters are drawn as capitals.
const GLYPHS: &[(char, [u8; GH])] = &[
    (' ', [0, 0, 0, 0, 0, 0, 0]),
    (
        '0',
        [
            0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110,
        ],
    ),
    (
        '1',
        [
            0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110,
        ],
    ),
    (
        '2',
        [
            0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111,
        ],
    ),
    (
        '3',
        [
            0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110,
        ],
    ),
    (
        '4',
        [
            0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010,
        ],
    ),
    (
        '5',
        [
            0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110,
        ],
    ),
    (
        '6',
        [
            0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110,
        ],
    ),
    (
        '7',
        [
            0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000,
        ],
    ),
    (
        '8',
        [
            0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110,
        ],
    ),
    (
        '9',
        [
            0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100,
        ],
    ),
    (
        'A',
        [
            0b01110, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001,
        ],
    ),
    (
        'B',
        [
            0b11110, 0b10001, 0b10001, 0b11110, 0b10001, 0b10001, 0b11110,
        ],
    ),
    (
        'C',
        [
            0b01110, 0b10001, 0b10000, 0b10000, 0b10000, 0b10001, 0b01110,
        ],
    ),
    (
        'D',
        [
            0b11100, 0b10010, 0b10001, 0b10001, 0b10001, 0b10010, 0b11100,
        ],
    ),
    (
        'E',
        [
            0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111,
        ],
    ),
    (
        'F',
        [
            0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b10000,
        ],
    ),
    (
        'G',
        [
            0b01110, 0b10001, 0b10000, 0b10111, 0b10001, 0b10001, 0b01111,
        ],
    ),
    (
        'H',
        [
            0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001,
        ],
    ),
    (
        'I',
        [
            0b01110, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110,
        ],
    ),
    (
        'J',
        [
            0b00111, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100,
        ],
    ),
    (
        'K',
        [
            0b10001, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b10001,
        ],
    ),
    (
        'L',
        [
            0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111,
        ],
    ),
    (
        'M',
        [
            0b10001, 0b11011, 0b10101, 0b10101, 0b10001, 0b10001, 0b10001,
        ],
    ),
    (
        'N',
        [
            0b10001, 0b10001, 0b11001, 0b10101, 0b10011, 0b10001, 0b10001,
        ],
    ),
    (
        'O',
        [
            0b01110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110,
        ],
    ),
    (
        'P',
        [
            0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000, 0b10000,
        ],
    ),
    (
        'Q',
        [
            0b01110, 0b10001, 0b10001, 0b10001, 0b10101, 0b10010, 0b01101,
        ],
    ),
    (
        'R',
        [
            0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001,
        ],
    ),
    (
        'S',
        [
            0b01111, 0b10000, 0b10000, 0b01110, 0b00001, 0b00001, 0b11110,
        ],
    ),
    (
        'T',
        [
            0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100,
        ],
    ),
    (
        'U',
        [
            0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110,
        ],
    ),
    (
        'V',
        [
            0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100,
        ],
    ),
    (
        'W',
        [
            0b10001, 0b10001, 0b10001, 0b10101, 0b10101, 0b10101, 0b01010,
        ],
    ),
    (
        'X',
        [
            0b10001, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b10001,
        ],
    ),
    (
        'Y',
        [
            0b10001, 0b10001, 0b10001, 0b01010, 0b00100, 0b00100, 0b00100,
        ],
    ),
    (
        'Z',
        [
            0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b11111,
        ],
    ),
    ('.', [0, 0, 0, 0, 0, 0b01100, 0b01100]),
    (',', [0, 0, 0, 0, 0b01100, 0b00100, 0b01000]),
    (
        '%',
        [
            0b11000, 0b11001, 0b00010, 0b00100, 0b01000, 0b10011, 0b00011,
        ],
    ),
    ('/', [0, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0]),
    (
        '(',
        [
            0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00100, 0b00010,
        ],
    ),
    (
        ')',
        [
            0b01000, 0b00100, 0b00010, 0b00010, 0b00010, 0b00100, 0b01000,
        ],
    ),
    ('-', [0, 0, 0, 0b11111, 0, 0, 0]),
    (':', [0, 0b01100, 0b01100, 0, 0b01100, 0b01100, 0]),
    (';', [0, 0b01100, 0b01100, 0, 0b01100, 0b00100, 0b01000]),
    ('+', [0, 0b00100, 0b00100, 0b11111, 0b00100, 0b00100, 0]),
    ('=', [0, 0, 0b11111, 0, 0b11111, 0, 0]),
    (
        '<',
        [
            0b00010, 0b00100, 0b01000, 0b10000, 0b01000, 0b00100, 0b00010,
        ],
    ),
    (
        '>',
        [
            0b01000, 0b00100, 0b00010, 0b00001, 0b00010, 0b00100, 0b01000,
        ],
    ),
    ('_', [0, 0, 0, 0, 0, 0, 0b11111]),
    ('*', [0, 0b00100, 0b10101, 0b01110, 0b10101, 0b00100, 0]),
    ('\'', [0b00100, 0b00100, 0b01000, 0, 0, 0, 0]),
    (
        'µ',
        [0, 0b10001, 0b10001, 0b10001, 0b10011, 0b11101, 0b10000],
    ),
    (
        '?',
        [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0, 0b00100],
    ),
];

fn glyph(c: char) -> [u8; GH] {
    let c = c.to_ascii_uppercase();
    GLYPHS
        .iter()
        .find(|(g, _)| *g == c)
        .or_else(|| GLYPHS.iter().find(|(g, _)| *g == '?'))
        .map_or([0; GH], |(_, rows)| *rows)
}

impl Canvas {
    /// A `w`×`h` canvas filled with `bg`.
    pub fn new(w: usize, h: usize, bg: Rgb) -> Canvas {
        Canvas {
            w,
            h,
            px: vec![bg; w * h],
        }
    }

    /// Width and height, pixels.
    #[cfg(test)]
    pub fn size(&self) -> (usize, usize) {
        (self.w, self.h)
    }

    /// The pixel at (x, y), if inside.
    #[cfg(test)]
    pub fn get(&self, x: usize, y: usize) -> Option<Rgb> {
        (x < self.w && y < self.h).then(|| self.px[y * self.w + x])
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            self.px[y as usize * self.w + x as usize] = c;
        }
    }

    /// A filled rectangle.
    pub fn fill_rect(&mut self, x: f64, y: f64, w: f64, h: f64, c: Rgb) {
        let (x0, y0) = (x.round() as i64, y.round() as i64);
        let (x1, y1) = ((x + w).round() as i64, (y + h).round() as i64);
        for yy in y0..y1 {
            for xx in x0..x1 {
                self.set(xx, yy, c);
            }
        }
    }

    /// A filled disc.
    pub fn dot(&mut self, cx: f64, cy: f64, r: f64, c: Rgb) {
        let (x0, x1) = ((cx - r).floor() as i64, (cx + r).ceil() as i64);
        let (y0, y1) = ((cy - r).floor() as i64, (cy + r).ceil() as i64);
        for y in y0..=y1 {
            for x in x0..=x1 {
                let (dx, dy) = (x as f64 - cx, y as f64 - cy);
                if dx * dx + dy * dy <= r * r {
                    self.set(x, y, c);
                }
            }
        }
    }

    /// A line `width` pixels wide; with `dash` = (on, off) pixels, dashed.
    pub fn line(
        &mut self,
        (x0, y0): (f64, f64),
        (x1, y1): (f64, f64),
        width: f64,
        c: Rgb,
        dash: Option<(f64, f64)>,
    ) {
        if ![x0, y0, x1, y1].iter().all(|v| v.is_finite()) {
            return;
        }
        let len = ((x1 - x0).powi(2) + (y1 - y0).powi(2)).sqrt();
        let steps = (len * 2.0).ceil().max(1.0) as usize;
        let r = (width / 2.0).max(0.5);
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            if let Some((on, off)) = dash {
                if (t * len) % (on + off) >= on {
                    continue;
                }
            }
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            if width <= 1.0 {
                self.set(x.round() as i64, y.round() as i64, c);
            } else {
                self.dot(x, y, r, c);
            }
        }
    }

    /// The width of `s` at `scale`, pixels.
    pub fn text_width(s: &str, scale: usize) -> usize {
        s.chars().count() * (GW + 1) * scale
    }

    /// Text whose baseline-bottom is at `y`, anchored at `x`.
    pub fn text(&mut self, x: f64, y: f64, s: &str, scale: usize, anchor: Anchor, c: Rgb) {
        let w = Self::text_width(s, scale) as f64;
        let left = match anchor {
            Anchor::Start => x,
            Anchor::Middle => x - w / 2.0,
            Anchor::End => x - w,
        }
        .round() as i64;
        let top = (y - (GH * scale) as f64).round() as i64;
        let sc = scale as i64;
        for (i, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            let gx = left + i as i64 * (GW as i64 + 1) * sc;
            for (ry, bits) in rows.iter().enumerate() {
                for cx in 0..GW {
                    if bits >> (GW - 1 - cx) & 1 == 1 {
                        for dy in 0..sc {
                            for dx in 0..sc {
                                self.set(gx + cx as i64 * sc + dx, top + ry as i64 * sc + dy, c);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Text read from bottom to top (a y-axis label), centred on (x, y).
    pub fn text_up(&mut self, x: f64, y: f64, s: &str, scale: usize, c: Rgb) {
        let w = Self::text_width(s, scale) as i64;
        let sc = scale as i64;
        let (cx0, cy0) = (x.round() as i64, y.round() as i64);
        for (i, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            // Along the text runs up the page; a glyph's rows run right.
            let along = i as i64 * (GW as i64 + 1) * sc - w / 2;
            for (ry, bits) in rows.iter().enumerate() {
                for gx in 0..GW {
                    if bits >> (GW - 1 - gx) & 1 == 1 {
                        for d1 in 0..sc {
                            for d2 in 0..sc {
                                let u = along + gx as i64 * sc + d1;
                                let v = ry as i64 * sc + d2 - (GH as i64 * sc) / 2;
                                self.set(cx0 + v, cy0 - u, c);
                            }
                        }
                    }
                }
            }
        }
    }

    /// The canvas as an 8-bit RGB PNG.
    pub fn to_png(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity((self.w * 3 + 1) * self.h);
        for row in self.px.chunks(self.w.max(1)) {
            raw.push(0); // filter: none
            for p in row {
                raw.extend_from_slice(p);
            }
        }
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        // Writing to a Vec cannot fail.
        let _ = z.write_all(&raw);
        let idat = z.finish().unwrap_or_default();
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(self.w as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.h as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, RGB, deflate, no filter, no interlace
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(&mut out, b"IDAT", &idat);
        chunk(&mut out, b"IEND", &[]);
        out
    }
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.sum().to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    #[test]
    fn a_png_decodes_to_what_was_drawn() {
        let mut c = Canvas::new(40, 20, [255, 255, 255]);
        c.fill_rect(0.0, 0.0, 10.0, 5.0, rgb("#ff0000"));
        c.line((0.0, 19.0), (39.0, 19.0), 1.0, [0, 0, 255], None);
        let png = c.to_png();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: length 13, then the size.
        assert_eq!(&png[8..16], &[0, 0, 0, 13, b'I', b'H', b'D', b'R']);
        assert_eq!(&png[16..24], &[0, 0, 0, 40, 0, 0, 0, 20]);
        // Its CRC is the standard CRC-32 of type and data.
        let mut crc = flate2::Crc::new();
        crc.update(&png[12..29]);
        assert_eq!(&png[29..33], &crc.sum().to_be_bytes());
        // Inflate IDAT and find the pixels.
        let idat_len = u32::from_be_bytes(png[33..37].try_into().unwrap()) as usize;
        assert_eq!(&png[37..41], b"IDAT");
        let mut raw = Vec::new();
        flate2::read::ZlibDecoder::new(&png[41..41 + idat_len])
            .read_to_end(&mut raw)
            .unwrap();
        assert_eq!(raw.len(), 20 * (40 * 3 + 1));
        let at = |x: usize, y: usize| {
            let i = y * (40 * 3 + 1) + 1 + x * 3;
            [raw[i], raw[i + 1], raw[i + 2]]
        };
        assert_eq!(at(0, 0), [255, 0, 0]);
        assert_eq!(at(9, 4), [255, 0, 0]);
        assert_eq!(at(10, 4), [255, 255, 255]);
        assert_eq!(at(20, 19), [0, 0, 255]);
        assert!(png.ends_with(&[0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82]));
    }

    #[test]
    fn text_lands_where_anchored_and_off_canvas_is_clipped() {
        let mut c = Canvas::new(100, 30, [255; 3]);
        let ink = [0, 0, 0];
        c.text(50.0, 20.0, "1", 1, Anchor::Middle, ink);
        let inked: Vec<(usize, usize)> = (0..100)
            .flat_map(|x| (0..30).map(move |y| (x, y)))
            .filter(|&(x, y)| c.get(x, y) == Some(ink))
            .collect();
        assert!(!inked.is_empty());
        assert!(
            inked
                .iter()
                .all(|&(x, y)| (46..=53).contains(&x) && (13..20).contains(&y)),
            "{inked:?}"
        );
        // Unknown characters draw as '?', lower case as capitals; nothing
        // drawn outside the canvas panics.
        assert_eq!(glyph('a'), glyph('A'));
        assert_eq!(glyph('\u{2603}'), glyph('?'));
        c.text(-50.0, 500.0, "clipped", 3, Anchor::End, ink);
        c.text_up(-5.0, -5.0, "up", 2, ink);
        c.line((-10.0, -10.0), (1e3, 1e3), 3.0, ink, Some((4.0, 2.0)));
        c.line((f64::NAN, 0.0), (1.0, 1.0), 1.0, ink, None);
        c.dot(99.0, 29.0, 5.0, ink);
        assert_eq!(c.size(), (100, 30));
        assert_eq!(rgb("#1f77b4"), [0x1f, 0x77, 0xb4]);
        assert_eq!(rgb("nonsense"), [0, 0, 0]);
    }
}

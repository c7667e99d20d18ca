//! Reading rtload's stamp out of a publication's `data` leniently: `data` of any other
//! shape (someone else publishing on the channel) decodes as "no stamp" instead of failing
//! the whole message.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::StampView;

impl<'de> Deserialize<'de> for StampView {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StampVisitor)
    }
}

struct StampVisitor;

impl<'de> Visitor<'de> for StampVisitor {
    type Value = StampView;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StampView, A::Error> {
        let mut out = StampView::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::T => out.t = map.next_value::<LenientU64>()?.0,
                Key::Seq => out.seq = map.next_value::<LenientU64>()?.0,
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(out)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StampView, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(StampView::default())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<StampView, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<StampView, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<StampView, A::Error> {
        // rmp-serde reports MessagePack ext values this way; skip them.
        IgnoredAny.visit_enum(data).map(|_| StampView::default())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<StampView, E> {
        Ok(StampView::default())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<StampView, E> {
        Ok(StampView::default())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<StampView, E> {
        Ok(StampView::default())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<StampView, E> {
        Ok(StampView::default())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<StampView, E> {
        Ok(StampView::default())
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<StampView, E> {
        Ok(StampView::default())
    }
    fn visit_none<E: de::Error>(self) -> Result<StampView, E> {
        Ok(StampView::default())
    }
    fn visit_unit<E: de::Error>(self) -> Result<StampView, E> {
        Ok(StampView::default())
    }
}

/// A map key of `data`: only `t` and `seq` matter; keys of any type are accepted.
enum Key {
    T,
    Seq,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(match v {
                    "t" => Key::T,
                    "seq" => Key::Seq,
                    _ => Key::Other,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<Key, A::Error> {
                IgnoredAny.visit_map(a).map(|_| Key::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, a: A) -> Result<Key, A::Error> {
                IgnoredAny.visit_seq(a).map(|_| Key::Other)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Key, E> {
                Ok(Key::Other)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Key, E> {
                Ok(Key::Other)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Key, E> {
                Ok(Key::Other)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Key, E> {
                Ok(Key::Other)
            }
            fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Key, E> {
                Ok(Key::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Key, E> {
                Ok(Key::Other)
            }
        }
        deserializer.deserialize_any(KeyVisitor)
    }
}

/// For `#[serde(deserialize_with)]`: an optional unsigned integer that is absent, instead of
/// an error, when the value is of another type.
pub fn lenient_u64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    LenientU64::deserialize(deserializer).map(|v| v.0)
}

/// An unsigned integer if the value is one (or a non-negative integral float), else absent.
struct LenientU64(Option<u64>);

impl<'de> Deserialize<'de> for LenientU64 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = LenientU64;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<LenientU64, E> {
                Ok(LenientU64(Some(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<LenientU64, E> {
                Ok(LenientU64(u64::try_from(v).ok()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<LenientU64, E> {
                let ok = v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < 1.8e19;
                Ok(LenientU64(ok.then_some(v as u64)))
            }
            fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<LenientU64, A::Error> {
                IgnoredAny.visit_map(a).map(|_| LenientU64(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, a: A) -> Result<LenientU64, A::Error> {
                IgnoredAny.visit_seq(a).map(|_| LenientU64(None))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<LenientU64, D::Error> {
                d.deserialize_any(self)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<LenientU64, E> {
                Ok(LenientU64(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<LenientU64, E> {
                Ok(LenientU64(None))
            }
            fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<LenientU64, E> {
                Ok(LenientU64(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<LenientU64, E> {
                Ok(LenientU64(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<LenientU64, E> {
                Ok(LenientU64(None))
            }
        }
        deserializer.deserialize_any(V)
    }
}

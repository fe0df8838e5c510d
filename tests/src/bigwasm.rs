//! Large components, made here: an example component with a large core
//! module added to it. The added module is never instantiated, but an
//! engine compiles every module of a component, so it weighs on compile
//! time, compiled size and what an agent keeps resident, as the CPython or
//! SpiderMonkey inside a componentize-py or componentize-js component do;
//! the component still serves as the example does.

/// `base` (a component's bytes) with a core module of `functions`
/// functions of `ops` arithmetic steps each added; `seed` makes each
/// result a different component.
pub fn big_component(base: &[u8], seed: u32, functions: u32, ops: u32) -> Vec<u8> {
    assert!(base.starts_with(b"\0asm\x0d\0\x01\0"), "not a component");
    let module = core_module(seed, functions, ops);
    let mut out = base.to_vec();
    out.push(0x01); // a core module section
    leb(&mut out, module.len() as u64);
    out.extend_from_slice(&module);
    out
}

fn core_module(seed: u32, functions: u32, ops: u32) -> Vec<u8> {
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    // Types: (i32) -> i32.
    section(&mut m, 1, &[0x01, 0x60, 0x01, 0x7f, 0x01, 0x7f]);
    // Functions: all of type 0.
    let mut funcs = Vec::new();
    leb(&mut funcs, u64::from(functions));
    funcs.extend(std::iter::repeat_n(0u8, functions as usize));
    section(&mut m, 3, &funcs);
    // Code: x = param; then per step x = (x + c) * param ^ c', which no
    // compiler folds away.
    let mut code = Vec::new();
    leb(&mut code, u64::from(functions));
    for f in 0..functions {
        let mut body = vec![0x00]; // no locals
        body.extend([0x20, 0x00]); // local.get 0
        for i in 0..ops {
            let c = seed.wrapping_mul(2_654_435_761).wrapping_add(f.wrapping_mul(40_503)).wrapping_add(i) & 0x3fff_ffff;
            body.push(0x41); // i32.const
            sleb(&mut body, i64::from(c));
            body.push(0x6a); // i32.add
            body.extend([0x20, 0x00]); // local.get 0
            body.push(if i % 2 == 0 { 0x6c } else { 0x73 }); // i32.mul / i32.xor
        }
        body.push(0x0b); // end
        leb(&mut code, body.len() as u64);
        code.extend_from_slice(&body);
    }
    section(&mut m, 10, &code);
    m
}

fn section(m: &mut Vec<u8>, id: u8, body: &[u8]) {
    m.push(id);
    leb(m, body.len() as u64);
    m.extend_from_slice(body);
}

fn leb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn sleb(out: &mut Vec<u8>, mut v: i64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        let done = (v == 0 && byte & 0x40 == 0) || (v == -1 && byte & 0x40 != 0);
        out.push(if done { byte } else { byte | 0x80 });
        if done {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leb128_encodes_as_the_spec_says() {
        let enc = |v: u64| {
            let mut o = Vec::new();
            leb(&mut o, v);
            o
        };
        assert_eq!(enc(0), [0]);
        assert_eq!(enc(127), [0x7f]);
        assert_eq!(enc(128), [0x80, 0x01]);
        assert_eq!(enc(624_485), [0xe5, 0x8e, 0x26]);
        let senc = |v: i64| {
            let mut o = Vec::new();
            sleb(&mut o, v);
            o
        };
        assert_eq!(senc(63), [0x3f]);
        assert_eq!(senc(64), [0xc0, 0x00]);
        assert_eq!(senc(-1), [0x7f]);
        assert_eq!(senc(-123_456), [0xc0, 0xbb, 0x78]);
    }

    #[test]
    fn the_big_component_is_the_size_asked_and_differs_by_seed() {
        let base = std::fs::read(crate::repo().join("examples/hello-http.wasm")).unwrap();
        let a = big_component(&base, 1, 100, 100);
        let b = big_component(&base, 2, 100, 100);
        assert!(a.len() > base.len() + 100 * 100 * 6, "{}", a.len());
        assert_eq!(a.len(), b.len());
        assert_ne!(a, b);
    }
}

//! Sample recordings: PCM WAV files of a tone with a correct header, for the demo and the tests.

/// A mono 16-bit 8 kHz PCM WAV of `seconds` of a tone, with a correct header.
pub fn wav_bytes(seconds: f64, freq: f64) -> Vec<u8> {
    let rate = 8000u32;
    let n = (seconds * rate as f64) as u32;
    let mut out = wav_header(n * 2);
    for i in 0..n {
        let t = i as f64 / rate as f64;
        let v = ((t * freq * std::f64::consts::TAU).sin() * 8000.0) as i16;
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// A 44-byte PCM WAV header for `data_len` bytes of 8 kHz 16-bit mono samples.
pub fn wav_header(data_len: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(44);
    h.extend_from_slice(b"RIFF");
    h.extend_from_slice(&(36 + data_len).to_le_bytes());
    h.extend_from_slice(b"WAVEfmt ");
    h.extend_from_slice(&16u32.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes()); // PCM
    h.extend_from_slice(&1u16.to_le_bytes()); // mono
    h.extend_from_slice(&8000u32.to_le_bytes());
    h.extend_from_slice(&16000u32.to_le_bytes());
    h.extend_from_slice(&2u16.to_le_bytes());
    h.extend_from_slice(&16u16.to_le_bytes());
    h.extend_from_slice(b"data");
    h.extend_from_slice(&data_len.to_le_bytes());
    h
}

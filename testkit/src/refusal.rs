//! Assertions on a refused call: the code and message of an API refusal (`net::Error::Api`)
//! or of a refusal the TTP sent the secure component (`secure_component::Error::TtpRefused`).

/// The (status, code, message) of an API refusal; panics on anything else.
pub fn refusal<T: std::fmt::Debug>(result: Result<T, net::Error>) -> (u16, String, String) {
    match result {
        Err(net::Error::Api { status, code, message }) => (status, code, message),
        other => panic!("expected an API refusal, got {other:?}"),
    }
}

/// The refusal is `code`, a 4xx with a message; returns the message.
pub fn expect_code<T: std::fmt::Debug>(result: Result<T, net::Error>, code: &str) -> String {
    let (status, got, message) = refusal(result);
    assert_eq!(got, code, "HTTP {status}: {message}");
    assert!((400..500).contains(&status), "a refusal is a 4xx, got {status} {got}: {message}");
    assert!(!message.is_empty(), "{code} without a message");
    message
}

/// The code of an API refusal (printed with its message); panics on anything else.
pub fn client_code<T: std::fmt::Debug>(result: Result<T, net::Error>) -> String {
    let (_, code, message) = refusal(result);
    println!("  refused ({code}): {message}");
    code
}

/// The code of a refusal the TTP sent the secure component (printed with its message);
/// panics on anything else.
pub fn ttp_code<T: std::fmt::Debug>(result: Result<T, secure_component::Error>) -> String {
    match result {
        Err(secure_component::Error::TtpRefused { code, message, .. }) => {
            println!("  refused ({code}): {message}");
            code
        }
        other => panic!("expected a TTP refusal, got {other:?}"),
    }
}

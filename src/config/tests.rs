use super::*;

fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml("test.toml", text, no_env())
}

fn error_line(text: &str) -> String {
    load(text)
        .expect_err("config should be refused")
        .to_string()
}

#[test]
fn embedded_default_is_valid_and_matches_the_code_defaults() {
    let from_file = Config::load_with_env(None, no_env()).expect("embedded default");
    let from_code = Config::from_raw(RawConfig::default()).expect("code defaults");

    assert_eq!(from_file.to_masked_toml(), from_code.to_masked_toml());
}

#[test]
fn empty_file_takes_every_default() {
    let config = load("").expect("empty config");

    assert_eq!(config.kafka.brokers, Brokers::Embedded);
    assert_eq!(config.kafka.dead_letter_topic, "rebeld.preferences.dlq");
    assert_eq!(config.runtime.device, DeviceSetting::Auto);
}

#[test]
fn unknown_key_is_named_with_its_value() {
    let line = error_line("[train]\nlearning_rat = 0.1\n");

    assert!(line.contains("learning_rat"), "{line}");
    assert!(line.contains("0.1"), "{line}");
    assert!(!line.contains('\n'), "{line}");
}

#[test]
fn unknown_section_is_refused() {
    let line = error_line("[trainer]\nradius = 1\n");

    assert!(line.contains("trainer"), "{line}");
}

#[test]
fn negative_learning_rate_is_named() {
    let line = error_line("[train]\nlearning_rate = -0.001\n");

    assert!(line.contains("train.learning_rate = -0.001"), "{line}");
}

#[test]
fn negative_radius_is_named() {
    let line = error_line("[train]\nradius = -1.5\n");

    assert!(line.contains("train.radius = -1.5"), "{line}");
}

#[test]
fn listener_that_is_not_an_address_is_named() {
    let line = error_line("[metrics]\nlisten = \"localhost:http\"\n");

    assert!(line.contains("metrics.listen"), "{line}");
    assert!(line.contains("localhost:http"), "{line}");
}

#[test]
fn wrong_type_names_the_key() {
    let line = error_line("[buffer]\nmax_rows = \"many\"\n");

    assert!(line.contains("buffer.max_rows"), "{line}");
    assert!(line.contains("many"), "{line}");
}

#[test]
fn bad_device_is_refused() {
    assert!(error_line("[runtime]\ndevice = \"gpu\"\n").contains("runtime.device"));
    assert_eq!(
        load("[runtime]\ndevice = \"cuda:1\"\n")
            .expect("cuda:1")
            .runtime
            .device,
        DeviceSetting::Cuda(1)
    );
}

#[test]
fn micro_batch_must_divide_batch() {
    let line = error_line("[train]\nbatch_size = 8\nmicro_batch_size = 3\n");

    assert!(line.contains("train.micro_batch_size = 3"), "{line}");
}

#[test]
fn public_listener_needs_a_token_or_explicit_anonymity() {
    let public = "[server]\nlisten = \"0.0.0.0:8080\"\n";
    assert!(error_line(public).contains("server.listen"));

    let anonymous = format!("{public}allow_anonymous = true\n");
    assert!(load(&anonymous).is_ok());

    let with_token = format!("{public}read_tokens = [\"s3cret\"]\n");
    assert!(load(&with_token).is_ok());
}

#[test]
fn kafka_properties_cannot_take_over_offsets() {
    let line = error_line("[kafka.properties]\n\"enable.auto.commit\" = \"true\"\n");

    assert!(line.contains("enable.auto.commit"), "{line}");
}

#[test]
fn environment_overrides_the_file() {
    let env = vec![
        ("REBELD__TRAIN__RADIUS".to_owned(), "0.25".to_owned()),
        ("REBELD__KAFKA__TOPIC".to_owned(), "feedback".to_owned()),
        (
            "REBELD__SERVER__READ_TOKENS".to_owned(),
            "[\"abc\"]".to_owned(),
        ),
        ("UNRELATED".to_owned(), "1".to_owned()),
    ];
    let config = Config::from_toml("t", "[train]\nradius = 0.1\n", env).expect("config");

    assert_eq!(config.train.radius, 0.25);
    assert_eq!(config.kafka.topic, "feedback");
    assert_eq!(config.kafka.dead_letter_topic, "feedback.dlq");
    assert_eq!(config.server.read_tokens[0].expose(), "abc");
}

#[test]
fn environment_override_with_a_bad_value_is_named() {
    let env = vec![("REBELD__TRAIN__RADIUS".to_owned(), "-2".to_owned())];
    let line = Config::from_toml("t", "", env)
        .expect_err("refused")
        .to_string();

    assert!(line.contains("train.radius = -2"), "{line}");
}

#[test]
fn masked_rendering_hides_secrets() {
    let text = "[server]\nadmin_tokens = [\"topsecret\"]\n[kafka]\nsasl_password = \"pw123\"\n";
    let rendered = load(text).expect("config").to_masked_toml();

    assert!(
        !rendered.contains("topsecret") && !rendered.contains("pw123"),
        "{rendered}"
    );
    assert!(rendered.contains(MASK));
}

#[test]
fn production_example_is_valid_once_tokens_come_from_the_environment() {
    let text = include_str!("../../config/production.toml");
    let env = vec![(
        "REBELD__SERVER__READ_TOKENS".to_owned(),
        "[\"t\"]".to_owned(),
    )];

    let config = Config::from_toml("production.toml", text, env).expect("production example");
    assert_eq!(config.train.micro_batch_size, 8);
    assert!(Config::from_toml("production.toml", text, no_env()).is_err());
}

#[test]
fn secrets_are_not_echoed_in_errors_and_may_look_like_numbers() {
    let line = error_line("[server]\nread_tokens = \"s3cr3ttoken\"\n");
    assert!(!line.contains("s3cr3ttoken"), "{line}");
    assert!(line.contains("server.read_tokens"), "{line}");

    let env = vec![(
        "REBELD__KAFKA__SASL_PASSWORD".to_owned(),
        "12345".to_owned(),
    )];
    let config = Config::from_toml("t", "", env).expect("numeric password");
    assert_eq!(config.kafka.sasl_password.expect("set").expose(), "12345");
}

#[test]
fn kafka_properties_take_bare_numbers_and_mask_credentials() {
    let text = "[kafka.properties]\n\"session.timeout.ms\" = 6000\n\"sasl.password\" = \"leak\"\n";
    let config = load(text).expect("config");

    assert_eq!(config.kafka.properties["session.timeout.ms"], "6000");
    let rendered = config.to_masked_toml();
    assert!(!rendered.contains("leak"), "{rendered}");
}

#[test]
fn token_counts_are_settings_and_bearer_tokens_are_secrets() {
    assert!(!is_sensitive("model.max_prompt_tokens"));
    assert!(!is_sensitive("model.max_response_tokens"));
    assert!(is_sensitive("server.read_tokens"));
    assert!(is_sensitive("server.admin_tokens"));
    assert!(is_sensitive("kafka.properties.sasl.oauthbearer.config"));

    let env = vec![(
        "REBELD__MODEL__MAX_PROMPT_TOKENS".to_owned(),
        "192".to_owned(),
    )];
    let config = Config::from_toml("t", "", env).expect("a count from the environment");
    assert_eq!(config.model.max_prompt_tokens, 192);
}

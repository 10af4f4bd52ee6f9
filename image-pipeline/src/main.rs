use anyhow::Result;
fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let profile = image_pipeline::profile::LoadedProfile::load(&args[1])?;
    let mut opts = image_pipeline::build::BuildOptions::new(profile, args[2].clone().into());
    opts.apt_cache = "/tmp/ipt/cache".into();
    opts.updates = false;
    opts.keep_work = true;
    let r = image_pipeline::build::build(&opts)?;
    println!("{} {} {} {} {:.1}s", r.raw_sha256, r.qcow2_sha256, r.raw_size, r.qcow2_size, r.seconds);
    println!("{}", serde_json::to_string_pretty(&r.tests).unwrap());
    Ok(())
}

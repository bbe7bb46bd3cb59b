fn main() -> anyhow::Result<()> {
    anyhow::bail!("not built yet: see the open issues")
}
